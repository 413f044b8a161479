//! Send and receive through the real commands: a volume's snapshots, whole and incremental,
//! written by `imgpool send` to a file and applied by `imgpool recv` in a second pool (another
//! state dir and disks, standing for another node), checked byte for byte against a model; and
//! streams that are damaged, cut or meant for another base, each refused with the target as
//! it was.

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;

const MIB: usize = 1 << 20;
const SIZE: usize = 8 * MIB;

fn send(pool: &TestPool, args: &[&str], to: &Path) -> Output {
    let mut all = vec!["send"];
    all.extend_from_slice(args);
    pool.command(&all)
        .stdout(File::create(to).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn send_ok(pool: &TestPool, args: &[&str], to: &Path) {
    let out = send(pool, args, to);
    assert!(
        out.status.success(),
        "send {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn recv(pool: &TestPool, args: &[&str], from: &Path) -> Output {
    let mut all = vec!["recv"];
    all.extend_from_slice(args);
    pool.command(&all)
        .stdin(File::open(from).unwrap())
        .output()
        .unwrap()
}

fn recv_ok(pool: &TestPool, args: &[&str], from: &Path) {
    let out = recv(pool, args, from);
    assert!(
        out.status.success(),
        "recv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything a receive may change: the snapshots (name, guid), their bytes and the live bytes.
type VolumeState = (Vec<(String, String)>, Vec<Vec<u8>>, Vec<u8>);

fn volume_state(pool: &TestPool, mount: &MountGuard, volume: &str) -> VolumeState {
    let listed = snapshot_list(pool, volume);
    let bytes = listed
        .iter()
        .map(|(name, _)| read_mounted(&mount.mountpoint.join("snapshots").join(volume).join(name)))
        .collect();
    let live = read_mounted(&mount.mountpoint.join("volumes").join(volume));
    wait_closed(pool, volume);
    (listed, bytes, live)
}

/// Random writes (some of zeros, some unaligned) and discards through the mount, with the
/// model kept beside.
fn scribble(file: &File, path: &Path, model: &mut [u8], rng: &mut Rng, ops: usize) {
    for _ in 0..ops {
        let offset = rng.below(SIZE as u64 - 1) as usize;
        let len = (1 + rng.below(200_000) as usize).min(SIZE - offset);
        match rng.below(6) {
            0 => {
                let status = std::process::Command::new("fallocate")
                    .args([
                        "--punch-hole",
                        "--keep-size",
                        "--offset",
                        &offset.to_string(),
                        "--length",
                        &len.to_string(),
                    ])
                    .arg(path)
                    .status()
                    .unwrap();
                assert!(status.success());
                model[offset..offset + len].fill(0);
            }
            1 => {
                file.write_all_at(&vec![0u8; len], offset as u64).unwrap();
                model[offset..offset + len].fill(0);
            }
            _ => {
                let seed = rng.next();
                let data: Vec<u8> = (0..len)
                    .map(|i| (seed.wrapping_add(i as u64 * 131) >> 3) as u8)
                    .collect();
                file.write_all_at(&data, offset as u64).unwrap();
                model[offset..offset + len].copy_from_slice(&data);
            }
        }
    }
    file.sync_all().unwrap();
}

/// A base image of 4 MiB: data, a hole, data.
fn base_image(pool: &TestPool, seed: u64) -> Vec<u8> {
    let path = pool.path("base.img");
    random_file(&path, 4 * MIB as u64, seed);
    let status = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", "1048576", "--length", "1048576"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(&path).unwrap()
}

#[test]
fn snapshots_sent_whole_and_incrementally_arrive_byte_equal() {
    let test = "snapshots_sent_whole_and_incrementally_arrive_byte_equal";
    if !can_mount(test) {
        return;
    }
    let here = TestPool::new(2);
    let there = TestPool::new(2);
    let mut model = base_image(&here, 11);
    std::fs::copy(here.path("base.img"), there.path("base.img")).unwrap();
    here.add_image("base", &here.path("base.img"), 1);
    // The other pool has the same image under another name (matched by SHA-512).
    there.add_image("golden", &there.path("base.img"), 1);
    model.resize(SIZE, 0);
    here.ok(&[
        "volume",
        "create",
        "v",
        "--image",
        "base",
        "--size",
        &SIZE.to_string(),
    ]);
    let mount_here = here.mount();
    let mount_there = there.mount();
    let path = mount_here.mountpoint.join("volumes/v");
    read_mounted(&path);
    wait_closed(&here, "v");

    let mut rng = Rng(0x5e4d);
    let mut at: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 1..=6 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        scribble(&file, &path, &mut model, &mut rng, 12);
        drop(file);
        wait_closed(&here, "v");
        let name = format!("s{i}");
        here.ok(&["snapshot", "create", &format!("v@{name}")]);
        at.insert(name, model.clone());
    }
    let stream = here.path("stream");

    // Whole, then every snapshot between, then one skipping s5.
    send_ok(&here, &["v@s1"], &stream);
    recv_ok(&there, &["w"], &stream);
    send_ok(&here, &["v@s4", "--from", "s1", "--from-all"], &stream);
    recv_ok(&there, &["w"], &stream);
    send_ok(&here, &["v@s6", "--from", "s4"], &stream);
    recv_ok(&there, &["w"], &stream);

    let sent: Vec<(String, String)> = snapshot_list(&here, "v")
        .into_iter()
        .filter(|(name, _)| name != "s5")
        .collect();
    assert_eq!(
        snapshot_list(&there, "w"),
        sent,
        "names and guids carried over"
    );
    for (name, _) in &sent {
        let got = read_mounted(&mount_there.mountpoint.join("snapshots/w").join(name));
        assert!(got == at[name], "snapshot {name} differs from the model");
    }
    assert!(read_mounted(&mount_there.mountpoint.join("volumes/w")) == at["s6"]);
    wait_closed(&there, "w");

    // The live volume, sent while a mount has it open (its daemon pins what is read): more
    // writes after s6, the file held open during the send.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    scribble(&file, &path, &mut model, &mut rng, 12);
    send_ok(&here, &["v", "--from", "s6"], &stream);
    drop(file);
    recv_ok(&there, &["w"], &stream);
    assert!(
        read_mounted(&mount_there.mountpoint.join("volumes/w")) == model,
        "the live volume arrived"
    );
    wait_closed(&there, "w");
    // The temporary snapshot of the live send is gone on both sides.
    assert_eq!(snapshot_list(&there, "w"), sent);
    assert!(
        snapshot_list(&here, "v")
            .iter()
            .all(|(n, _)| n.starts_with('s')),
        "{:?}",
        snapshot_list(&here, "v")
    );
    mount_there.unmount();
    mount_here.unmount();
}

/// Two pools with `v` (s1, s2, s3 over zeros) here and `w` received up to s1 there; returns
/// the stream of s1 → s2.
fn a_pair(here: &TestPool, there: &TestPool, mount_here: &MountGuard) -> std::path::PathBuf {
    here.ok(&["volume", "create", "v", "--size", &SIZE.to_string()]);
    let path = mount_here.mountpoint.join("volumes/v");
    read_mounted(&path);
    let mut model = vec![0u8; SIZE];
    let mut rng = Rng(77);
    for i in 1..=3 {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        scribble(&file, &path, &mut model, &mut rng, 8);
        drop(file);
        wait_closed(here, "v");
        here.ok(&["snapshot", "create", &format!("v@s{i}")]);
    }
    let whole = here.path("whole");
    send_ok(here, &["v@s1"], &whole);
    recv_ok(there, &["w"], &whole);
    let stream = here.path("s1-s2");
    send_ok(here, &["v@s2", "--from", "s1"], &stream);
    stream
}

#[test]
fn damaged_cut_or_misplaced_streams_are_refused_and_change_nothing() {
    let test = "damaged_cut_or_misplaced_streams_are_refused_and_change_nothing";
    if !can_mount(test) {
        return;
    }
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    let mount_here = here.mount();
    let mount_there = there.mount();
    let stream = a_pair(&here, &there, &mount_here);
    let before = volume_state(&there, &mount_there, "w");
    let bytes = std::fs::read(&stream).unwrap();
    let bad = here.path("bad");
    let refused = |what: &str, args: &[&str]| {
        let line = failed_cleanly(&format!("recv of {what}"), &recv(&there, args, &bad));
        assert!(
            volume_state(&there, &mount_there, "w") == before,
            "{what} changed the target"
        );
        line
    };

    // A byte flipped at a few places, from the header to the end record.
    for at in [10, 40, bytes.len() / 3, bytes.len() / 2, bytes.len() - 6] {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x01;
        std::fs::write(&bad, &damaged).unwrap();
        let line = refused(&format!("a flip at {at}"), &["w"]);
        assert!(
            line.contains("corrupt") || line.contains("record"),
            "flip at {at}: {line}"
        );
    }
    // Cut anywhere.
    for cut in [0, 5, 30, bytes.len() / 4, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        refused(&format!("a cut at {cut}"), &["w"]);
    }
    // Not a stream.
    std::fs::write(&bad, b"#!/bin/sh\necho not a stream\n").unwrap();
    let line = refused("a shell script", &["w"]);
    assert!(line.contains("not an imgpool stream"), "{line}");
    // Made for another base: s2 → s3 onto w, whose newest is s1.
    send_ok(&here, &["v@s3", "--from", "s2"], &bad);
    let line = refused("a stream from s2", &["w"]);
    assert!(line.contains("s2"), "{line}");
    // A whole stream onto an existing volume.
    send_ok(&here, &["v@s2"], &bad);
    refused("a whole stream onto w", &["w"]);

    // The good stream still applies, once.
    recv_ok(&there, &["w"], &stream);
    let applied = volume_state(&there, &mount_there, "w");
    assert_ne!(applied.0, before.0, "s2 arrived");
    std::fs::copy(&stream, &bad).unwrap();
    failed_cleanly("the same stream again", &recv(&there, &["w"], &bad));
    assert!(volume_state(&there, &mount_there, "w") == applied);
    mount_there.unmount();
    mount_here.unmount();
}

#[test]
fn a_missing_base_image_is_named_and_travels_with_the_stream_when_asked() {
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    let base = base_image(&here, 5);
    let uuid = here.add_image("base", &here.path("base.img"), 1);
    here.ok(&["volume", "create", "v", "--image", "base"]);
    here.ok(&["snapshot", "create", "v@s1"]);
    let stream = here.path("stream");
    send_ok(&here, &["v@s1"], &stream);
    let line = failed_cleanly("recv without the image", &recv(&there, &["w"], &stream));
    assert!(
        line.contains("base") && line.contains(&uuid) && line.contains("--with-image"),
        "{line}"
    );
    assert!(there
        .json(&["volume", "list"])
        .as_array()
        .unwrap()
        .is_empty());

    send_ok(&here, &["v@s1", "--with-image"], &stream);
    recv_ok(&there, &["w"], &stream);
    let image = there.json(&["image", "show", "base"]);
    assert_eq!(
        image["sha512"],
        here.json(&["image", "show", "base"])["sha512"]
    );
    assert_eq!(image["size"], base.len() as u64);
    assert_eq!(there.json(&["volume", "show", "w"])["image"], "base");
}

/// An exported image's SHA-512 is computed after the export: a send of a volume over one
/// computes it for the stream's header, and a receiver whose only image of that content is an
/// export of its own, not yet summed, still finds it as the base.
#[test]
fn exported_images_whose_sum_is_pending_serve_as_bases_on_both_sides() {
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    let base = base_image(&here, 8);
    let export_of_base = |pool: &TestPool, image: &str| {
        pool.add_image("base", &here.path("base.img"), 1);
        pool.ok(&["volume", "create", "x", "--image", "base"]);
        pool.ok(&["snapshot", "create", "x@s"]);
        let added = pool.json(&["image", "add", image, "--from-volume", "x@s"]);
        assert!(added["sha512"].is_null(), "{added}");
        pool.ok(&["volume", "rm", "x", "--recursive"]);
        pool.ok(&["image", "rm", "base"]);
    };
    export_of_base(&here, "golden");
    export_of_base(&there, "copy");
    here.ok(&["volume", "create", "v", "--image", "golden"]);
    here.ok(&["snapshot", "create", "v@s1"]);

    let stream = here.path("stream");
    send_ok(&here, &["v@s1"], &stream);
    let sum = hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&base));
    assert_eq!(here.json(&["image", "show", "golden"])["sha512"], sum);
    recv_ok(&there, &["w"], &stream);
    assert_eq!(there.json(&["volume", "show", "w"])["image"], "copy");
    assert_eq!(there.json(&["image", "show", "copy"])["sha512"], sum);
    assert_eq!(
        there.json(&["image", "list"]).as_array().unwrap().len(),
        1,
        "no second image of the same content"
    );
}

#[test]
fn bad_sends_fail_with_one_line_and_write_nothing() {
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "v", "--size", "1048576"]);
    pool.ok(&["snapshot", "create", "v@a"]);
    pool.ok(&["snapshot", "create", "v@b"]);
    let out = pool.path("out");
    for (args, expected) in [
        (vec!["nope@a"], "nope"),
        (vec!["v@nope"], "nope"),
        (vec!["v@b", "--from", "nope"], "nope"),
        (vec!["v@a", "--from", "b"], "b"),
        (vec!["v@a", "--from", "a"], "a"),
    ] {
        let line = failed_cleanly(&format!("send {args:?}"), &send(&pool, &args, &out));
        assert!(line.contains(expected), "{args:?}: {line}");
        assert_eq!(
            std::fs::metadata(&out).unwrap().len(),
            0,
            "{args:?} wrote to its output"
        );
    }
    // The names of the pool's temporary snapshots are not a user's to take.
    for name in ["copy-tmp-1", "export-tmp-x", "recv-tmp-p-0"] {
        let line = pool.fails(&["snapshot", "create", &format!("v@{name}")]);
        assert!(line.contains("temporary"), "{name}: {line}");
    }
    assert_eq!(
        snapshot_list(&pool, "v")
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Runs `recv args` from `stream` in the background, killed `delay` after it started (unless
/// it ended first); whether it succeeded.
fn recv_killed_after(pool: &TestPool, args: &[&str], stream: &Path, delay: Duration) -> bool {
    let mut all = vec!["recv"];
    all.extend_from_slice(args);
    let mut child = ChildGuard(Some(
        pool.command(&all)
            .stdin(File::open(stream).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(delay);
    kill9(child.pid());
    child
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .success()
}

#[test]
fn a_receive_killed_at_any_instant_leaves_the_target_whole() {
    let test = "a_receive_killed_at_any_instant_leaves_the_target_whole";
    if !can_mount(test) {
        return;
    }
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    let mount_here = here.mount();
    let mount_there = there.mount();
    let size = 32 * MIB;
    here.ok(&["volume", "create", "v", "--size", &size.to_string()]);
    let path = mount_here.mountpoint.join("volumes/v");
    read_mounted(&path);
    let mut rng = Rng(3);
    let mut at = Vec::new();
    for i in 1..=2 {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for _ in 0..64 {
            let offset = rng.below((size - MIB) as u64) / 4096 * 4096;
            file.write_all_at(&vec![(rng.next() | 1) as u8; 256 * 1024], offset)
                .unwrap();
        }
        drop(file);
        wait_closed(&here, "v");
        here.ok(&["snapshot", "create", &format!("v@s{i}")]);
        at.push(read_mounted(
            &mount_here.mountpoint.join(format!("snapshots/v/s{i}")),
        ));
    }
    wait_closed(&here, "v");
    let whole = here.path("whole");
    let step = here.path("step");
    send_ok(&here, &["v@s1"], &whole);
    send_ok(&here, &["v@s2", "--from", "s1"], &step);

    // How long each takes whole, to spread the kills over it.
    let started = std::time::Instant::now();
    recv_ok(&there, &["w"], &whole);
    let whole_takes = started.elapsed();
    wait_closed(&there, "w");
    let started = std::time::Instant::now();
    recv_ok(&there, &["w"], &step);
    let step_takes = started.elapsed();
    there.ok(&["volume", "rm", "w", "--recursive"]);

    let instants = std::env::var("IMGPOOL_KILL_INSTANTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6u32);
    for i in 0..instants {
        // A new volume: there whole, or not at all.
        let delay = whole_takes.mul_f64(f64::from(i) / f64::from(instants));
        let done = recv_killed_after(&there, &["w"], &whole, delay);
        // The next command that changes the pool cleans up what the dead receive left.
        there.ok(&["gc"]);
        there.ok(&["fsck"]);
        let listed: Vec<String> = there
            .json(&["volume", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        if !done && listed.is_empty() {
            continue;
        }
        assert_eq!(listed, ["w"], "killed after {delay:?}");
        assert!(
            read_mounted(&mount_there.mountpoint.join("snapshots/w/s1")) == at[0],
            "killed after {delay:?}: s1 differs"
        );
        wait_closed(&there, "w");

        // An existing volume: at s1 as before, or at s2 whole.
        let delay = step_takes.mul_f64(f64::from(i) / f64::from(instants));
        let done = recv_killed_after(&there, &["w"], &step, delay);
        there.ok(&["gc"]);
        there.ok(&["fsck"]);
        let names: Vec<String> = snapshot_list(&there, "w")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let expected_live = match names.as_slice() {
            [a] if a == "s1" && !done => &at[0],
            [a, b] if a == "s1" && b == "s2" => &at[1],
            other => panic!("killed after {delay:?}: snapshots {other:?} (done: {done})"),
        };
        assert!(
            read_mounted(&mount_there.mountpoint.join("volumes/w")) == *expected_live,
            "killed after {delay:?}: the live volume is neither s1 nor s2"
        );
        wait_closed(&there, "w");
        there.ok(&["volume", "rm", "w", "--recursive"]);
    }
    mount_there.unmount();
    mount_here.unmount();
}

/// The second package of every refresh copy: the live volume as a temporary snapshot alone.
/// A receive of it that fails, or is killed at any instant, leaves the target at its snapshot
/// with nothing of the package (or, once committed, with the whole of it): never half-written.
#[test]
fn a_failed_or_killed_receive_of_the_live_state_leaves_the_target_whole() {
    let test = "a_failed_or_killed_receive_of_the_live_state_leaves_the_target_whole";
    if !can_mount(test) {
        return;
    }
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    let mount_here = here.mount();
    let mount_there = there.mount();
    let size = 16 * MIB;
    here.ok(&["volume", "create", "v", "--size", &size.to_string()]);
    let path = mount_here.mountpoint.join("volumes/v");
    read_mounted(&path);
    let mut rng = Rng(5);
    let mut write_some = || {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for _ in 0..48 {
            let offset = rng.below((size - MIB) as u64) / 4096 * 4096;
            file.write_all_at(&vec![(rng.next() | 1) as u8; 256 * 1024], offset)
                .unwrap();
        }
    };
    write_some();
    wait_closed(&here, "v");
    here.ok(&["snapshot", "create", "v@s1"]);
    let at_s1 = read_mounted(&mount_here.mountpoint.join("snapshots/v/s1"));
    write_some();
    let live = read_mounted(&path);
    wait_closed(&here, "v");
    let whole = here.path("whole");
    let now = here.path("now");
    send_ok(&here, &["v@s1"], &whole);
    send_ok(&here, &["v", "--from", "s1"], &now);
    let bytes = std::fs::read(&now).unwrap();
    let cut = here.path("cut");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).unwrap();
    let target = mount_there.mountpoint.join("volumes/w");
    let fresh = || {
        recv_ok(&there, &["w"], &whole);
        wait_closed(&there, "w");
    };

    fresh();
    let out = recv(&there, &["w"], &cut);
    assert!(!out.status.success(), "a cut stream was received");
    let names: Vec<String> = snapshot_list(&there, "w")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["s1"]);
    assert!(
        read_mounted(&target) == at_s1,
        "a cut receive of the live state left the volume half-written"
    );
    wait_closed(&there, "w");
    let started = std::time::Instant::now();
    recv_ok(&there, &["w"], &now);
    let takes = started.elapsed();
    assert!(read_mounted(&target) == live);
    wait_closed(&there, "w");
    there.ok(&["volume", "rm", "w", "--recursive"]);

    let instants = std::env::var("IMGPOOL_KILL_INSTANTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6u32);
    for i in 0..instants {
        fresh();
        let delay = takes.mul_f64(f64::from(i) / f64::from(instants));
        let done = recv_killed_after(&there, &["w"], &now, delay);
        there.ok(&["gc"]);
        there.ok(&["fsck"]);
        let names: Vec<String> = snapshot_list(&there, "w")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["s1"], "killed after {delay:?}");
        let content = read_mounted(&target);
        assert!(
            content == live || (!done && content == at_s1),
            "killed after {delay:?}: the live volume is neither s1 nor the sent state (done: {done})"
        );
        wait_closed(&there, "w");
        there.ok(&["volume", "rm", "w", "--recursive"]);
    }
    mount_there.unmount();
    mount_here.unmount();
}

/// Runs imgpool commands at once, each with its own standard input and output files.
fn at_once(pool: &TestPool, runs: &[(&[&str], Option<&Path>, &Path)]) -> Vec<Output> {
    let children: Vec<std::process::Child> = runs
        .iter()
        .map(|(args, input, output)| {
            pool.command(args)
                .stdin(match input {
                    Some(p) => Stdio::from(File::open(p).unwrap()),
                    None => Stdio::null(),
                })
                .stdout(File::create(output).unwrap())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// The SHA-512 of a volume at a snapshot, through an export.
fn exported_sha512(pool: &TestPool, image: &str, target: &str) -> String {
    pool.ok(&["image", "add", image, "--from-volume", target]);
    pool.json(&["image", "checksum", image])["sha512"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn sends_and_receives_run_at_once_and_every_success_holds() {
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    here.ok(&["volume", "create", "v", "--size", &(8 * MIB).to_string()]);
    here.ok(&["snapshot", "create", "v@s1"]);
    let streams: Vec<_> = (0..3).map(|i| here.path(&format!("s{i}"))).collect();

    // Three sends at once: two of the live volume (each its own temporary snapshot), one of s1.
    let sends = at_once(
        &here,
        &[
            (&["send", "v", "--from", "s1"], None, &streams[0]),
            (&["send", "v", "--from", "s1"], None, &streams[1]),
            (&["send", "v@s1"], None, &streams[2]),
        ],
    );
    for out in &sends {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        snapshot_list(&here, "v")
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["s1"],
        "no temporary snapshot left"
    );

    // Two receives of the same whole stream into one new volume at once: one makes it, the
    // other fails with one line; the volume holds s1.
    let outputs = [there.path("o1"), there.path("o2")];
    let recvs = at_once(
        &there,
        &[
            (&["recv", "w"], Some(&streams[2]), &outputs[0]),
            (&["recv", "w"], Some(&streams[2]), &outputs[1]),
        ],
    );
    let succeeded = recvs.iter().filter(|o| o.status.success()).count();
    assert_eq!(succeeded, 1, "{recvs:?}");
    let loser = recvs.iter().find(|o| !o.status.success()).unwrap();
    failed_cleanly("the second receive", loser);
    assert_eq!(
        exported_sha512(&there, "w-s1", "w@s1"),
        exported_sha512(&here, "v-s1", "v@s1")
    );

    // Both live increments onto it at once (each applies on s1 and keeps no snapshot): each
    // applies, or is refused with one line while the other holds the volume; nothing half.
    let recvs = at_once(
        &there,
        &[
            (&["recv", "w"], Some(&streams[0]), &outputs[0]),
            (&["recv", "w"], Some(&streams[1]), &outputs[1]),
        ],
    );
    assert!(recvs.iter().any(|o| o.status.success()), "{recvs:?}");
    for refused in recvs.iter().filter(|o| !o.status.success()) {
        failed_cleanly("the other increment", refused);
    }
    assert_eq!(
        exported_sha512(&there, "w-now", "w"),
        exported_sha512(&here, "v-now", "v")
    );

    // Two replaces of w at once (`recv --force` of two unlike whole streams) and a snapshot
    // racing them: each replace succeeds or fails with one line; w ends as exactly the volume
    // of one stream that succeeded (or as it was, when none did), alone under its name, with
    // no directory left of another.
    here.ok(&["volume", "create", "u", "--size", &(4 * MIB).to_string()]);
    here.ok(&["snapshot", "create", "u@t1"]);
    let other = here.path("s3");
    let sent = at_once(&here, &[(&["send", "u@t1"], None, &other)]);
    assert!(sent[0].status.success(), "{sent:?}");
    let replaces = at_once(
        &there,
        &[
            (&["recv", "w", "--force"], Some(&streams[2]), &outputs[0]),
            (&["recv", "w", "--force"], Some(&other), &outputs[1]),
            (&["snapshot", "create", "w@racing"], None, &there.path("o3")),
        ],
    );
    let racing = &replaces[2];
    let won: Vec<&str> = replaces[..2]
        .iter()
        .zip(["s1", "t1"])
        .filter(|(o, _)| o.status.success())
        .map(|(_, snap)| snap)
        .collect();
    for refused in replaces.iter().filter(|o| !o.status.success()) {
        failed_cleanly("a replace or the racing snapshot", refused);
    }
    let names: Vec<String> = snapshot_list(&there, "w")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let received: Vec<&String> = names.iter().filter(|n| *n != "racing").collect();
    // Both replaces may be refused (the snapshot held the volume when each tried): then w is
    // as it was, s1.
    assert!(
        received.len() == 1
            && (won.contains(&received[0].as_str()) || (won.is_empty() && received[0] == "s1")),
        "w has {names:?}; the replaces that succeeded sent {won:?}: {replaces:?}"
    );
    let kept = received[0].clone();
    // The racing snapshot, when taken, is on w (taken after the last replace) or was
    // discarded by a replace that said so.
    if racing.status.success() && !names.iter().any(|n| n == "racing") {
        let said: String = outputs
            .iter()
            .map(|o| std::fs::read_to_string(o).unwrap())
            .collect();
        assert!(
            said.lines()
                .any(|l| l.starts_with("discarded") && l.contains("racing")),
            "the snapshot 'racing' was taken and is gone, and no replace said it discarded it: {said}"
        );
    }
    let source = if kept == "s1" { "v@s1" } else { "u@t1" };
    assert_eq!(
        exported_sha512(&there, "w-replaced", &format!("w@{kept}")),
        exported_sha512(&here, "source-replaced", source)
    );
    assert_eq!(there.volume_names(), ["w"]);
    there.ok(&["fsck"]);
    assert_eq!(
        volume_dirs(&there),
        1,
        "a replaced volume's directory is left"
    );
    for pool in [&here, &there] {
        pool.ok(&["fsck"]);
    }
}

/// The volume directories on a pool's first disk: one per volume, once nothing is under way
/// (those of removals not finished, moved to `removed-volumes/`, count too).
fn volume_dirs(pool: &TestPool) -> usize {
    ["volumes", "removed-volumes"]
        .iter()
        .map(|dir| {
            std::fs::read_dir(pool.disks[0].join(".imgpool").join(dir))
                .map(|entries| entries.count())
                .unwrap_or(0)
        })
        .sum()
}

/// A whole stream that replaces an existing volume (`recv --force`), cut, or killed at
/// instants spread over its run: after the next start the volume is exactly the old one
/// (every snapshot and the live bytes) or exactly the new one, never both nor neither; no
/// row or directory of the other is left, and fsck finds nothing to say.
#[test]
fn a_replacing_receive_cut_or_killed_at_any_instant_leaves_the_old_volume_or_the_new_one() {
    let test =
        "a_replacing_receive_cut_or_killed_at_any_instant_leaves_the_old_volume_or_the_new_one";
    if !can_mount(test) {
        return;
    }
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    let mount_here = here.mount();
    let mount_there = there.mount();
    let mut rng = Rng(13);
    let write_some = |path: &Path, size: usize, pieces: usize, rng: &mut Rng| {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        for _ in 0..pieces {
            let offset = rng.below((size - MIB) as u64) / 4096 * 4096;
            file.write_all_at(&vec![(rng.next() | 1) as u8; 256 * 1024], offset)
                .unwrap();
        }
    };

    // The new volume: two snapshots, sent whole (as the first package of a copy).
    let size = 32 * MIB;
    here.ok(&["volume", "create", "v", "--size", &size.to_string()]);
    let path = mount_here.mountpoint.join("volumes/v");
    read_mounted(&path);
    for i in 1..=2 {
        write_some(&path, size, 64, &mut rng);
        wait_closed(&here, "v");
        here.ok(&["snapshot", "create", &format!("v@s{i}")]);
    }
    let whole = here.path("whole");
    send_ok(&here, &["v@s2", "--from-all"], &whole);
    let at = |name: &str| read_mounted(&mount_here.mountpoint.join("snapshots/v").join(name));
    let new: VolumeState = (
        snapshot_list(&here, "v"),
        vec![at("s1"), at("s2")],
        at("s2"),
    );

    // The old volume, made anew before each run: smaller, a snapshot of its own and writes
    // since.
    let old_size = 16 * MIB;
    let target = mount_there.mountpoint.join("volumes/w");
    let fresh_old = |rng: &mut Rng| -> VolumeState {
        if there.volume_names().contains(&"w".to_string()) {
            there.ok(&["volume", "rm", "--recursive", "w"]);
        }
        there.ok(&["volume", "create", "w", "--size", &old_size.to_string()]);
        read_mounted(&target);
        write_some(&target, old_size, 16, rng);
        wait_closed(&there, "w");
        there.ok(&["snapshot", "create", "w@mine"]);
        write_some(&target, old_size, 4, rng);
        wait_closed(&there, "w");
        volume_state(&there, &mount_there, "w")
    };
    let settled = |what: &str| {
        assert_eq!(there.volume_names(), ["w"], "{what}");
        assert_eq!(
            volume_dirs(&there),
            1,
            "{what}: a volume's directory is left"
        );
        there.ok(&["fsck"]);
    };

    // Without --force a whole stream onto it is refused, naming --force; a cut stream with
    // it changes nothing.
    let old = fresh_old(&mut rng);
    let line = failed_cleanly(
        "a whole stream without --force",
        &recv(&there, &["w"], &whole),
    );
    assert!(line.contains("--force"), "{line}");
    let bytes = std::fs::read(&whole).unwrap();
    let cut = here.path("cut");
    for keep in [bytes.len() / 10, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let out = recv(&there, &["w", "--force"], &cut);
        failed_cleanly(&format!("a stream cut at {keep}"), &out);
        assert!(
            volume_state(&there, &mount_there, "w") == old,
            "a stream cut at {keep} changed the old volume"
        );
        settled(&format!("a stream cut at {keep}"));
    }
    let started = std::time::Instant::now();
    recv_ok(&there, &["w", "--force"], &whole);
    let takes = started.elapsed();
    assert!(volume_state(&there, &mount_there, "w") == new);
    settled("replaced");

    let instants = std::env::var("IMGPOOL_KILL_INSTANTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6u32);
    let mut outcomes = (0, 0);
    for i in 0..instants {
        let old = fresh_old(&mut rng);
        // From the start to the end of an uncut run: the last lands where it ends.
        let delay = takes.mul_f64(f64::from(i + 1) / f64::from(instants));
        let done = recv_killed_after(&there, &["w", "--force"], &whole, delay);
        // The next command that changes the pool cleans up what the dead receive left.
        there.ok(&["gc"]);
        let now = volume_state(&there, &mount_there, "w");
        if now == new {
            outcomes.1 += 1;
        } else {
            assert!(
                now == old && !done,
                "killed after {delay:?} (done: {done}): the volume is neither the old one nor the new one (snapshots {:?})",
                now.0
            );
            outcomes.0 += 1;
        }
        settled(&format!("killed after {delay:?}"));
    }
    eprintln!("killed replacing receives: {outcomes:?} (old kept, new in place)");

    // Killed at the instants of its commit, where timing alone rarely lands (the receive
    // kills itself there: `IMGPOOL_TEST_DIE_AT`, read by debug builds only): before the
    // swap the old volume stays, from the swap on the new one is in place.
    for (point, replaced) in [
        ("replace-record-renamed", false),
        ("replace-swapped", true),
        ("removal-moved", true),
        ("removal-deleted", true),
    ] {
        let old = fresh_old(&mut rng);
        let out = there
            .command(&["recv", "w", "--force"])
            .env("IMGPOOL_TEST_DIE_AT", point)
            .stdin(File::open(&whole).unwrap())
            .output()
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(libc::SIGKILL),
            "{point}: the receive did not die there ({:?}, {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        there.ok(&["gc"]);
        let now = volume_state(&there, &mount_there, "w");
        assert!(
            &now == if replaced { &new } else { &old },
            "killed at {point}: the volume is not the {} one (snapshots {:?})",
            if replaced { "new" } else { "old" },
            now.0
        );
        settled(&format!("killed at {point}"));
    }
    mount_there.unmount();
    mount_here.unmount();
}
