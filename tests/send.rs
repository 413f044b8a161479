//! `imgpool send`: the stream of a volume no mount has open (read under its writer lock) and of
//! one a mount has open (read through the mount's snapshot files), decoded here by a small
//! reader of the format (`docs/send-receive.md`) and applied to the base image's bytes: each
//! snapshot equals the volume read at it. The live volume's temporary snapshot is gone after a
//! send that ended, that lost its reader, and after one killed (at the next send). Bad input
//! is refused with nothing written to standard output.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

/// The records of a stream, each checked (CRC32C, sequence), as (kind, payload).
fn records(stream: &[u8]) -> Vec<(u8, Vec<u8>)> {
    assert_eq!(&stream[..8], b"IMGPSTR1", "the stream's magic");
    let mut at = 8;
    let mut out = Vec::new();
    while at < stream.len() {
        let head = &stream[at..at + 13];
        let seq = u64::from_le_bytes(head[1..9].try_into().unwrap());
        let len = u32::from_le_bytes(head[9..13].try_into().unwrap()) as usize;
        let payload = &stream[at + 13..at + 13 + len];
        let crc = u32::from_le_bytes(stream[at + 13 + len..at + 17 + len].try_into().unwrap());
        assert_eq!(seq, out.len() as u64, "record sequence");
        assert_eq!(
            crc,
            crc32c::crc32c_append(crc32c::crc32c(head), payload),
            "record {seq}'s CRC32C"
        );
        out.push((head[0], payload.to_vec()));
        at += 17 + len;
    }
    assert_eq!(out.last().map(|r| r.0), Some(8), "the stream ends with End");
    out
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Applies a stream's snapshots on `content`: the header, and each snapshot's content.
fn apply(stream: &[u8], mut content: Vec<u8>) -> (serde_json::Value, Vec<Vec<u8>>) {
    let mut header = serde_json::Value::Null;
    let mut snapshots = Vec::new();
    for (kind, payload) in records(stream) {
        match kind {
            1 => header = serde_json::from_slice(&payload).unwrap(),
            4 => content.resize(u64_at(&payload, 4) as usize, 0),
            5 => {
                let offset = u64_at(&payload, 0) as usize;
                let data = &payload[8..];
                assert_eq!((offset % BLOCK, data.len() % BLOCK), (0, 0));
                content[offset..offset + data.len()].copy_from_slice(data);
            }
            6 => {
                let (offset, len) = (u64_at(&payload, 0) as usize, u64_at(&payload, 8) as usize);
                content[offset..offset + len].fill(0);
            }
            7 => snapshots.push(content.clone()),
            _ => {}
        }
    }
    (header, snapshots)
}

/// `imgpool send ARGS > file`: its exit status, stderr, and the file's bytes.
fn send(pool: &TestPool, args: &[&str]) -> (Option<i32>, String, Vec<u8>) {
    let path = pool.path("stream");
    let out = pool
        .command(&[&["send"], args].concat())
        .stdout(File::create(&path).unwrap())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read(&path).unwrap(),
    )
}

/// `send ARGS --json`, which must succeed: the summary and the stream.
fn sent(pool: &TestPool, args: &[&str]) -> (serde_json::Value, Vec<u8>) {
    let (code, stderr, stream) = send(pool, &[args, &["--json"]].concat());
    assert_eq!(code, Some(0), "send {args:?}: {stderr}");
    (serde_json::from_str(&stderr).unwrap(), stream)
}

fn wait_closed(pool: &TestPool) {
    assert!(
        poll(Duration::from_secs(5), Duration::from_millis(20), || pool
            .json(&["volume", "show", "v"])["open_by_pid"]
            .is_null()),
        "the volume stays open"
    );
}

#[test]
fn a_sent_volume_applies_on_its_base_as_each_snapshot_and_leaves_no_temporary_snapshot() {
    let test =
        "a_sent_volume_applies_on_its_base_as_each_snapshot_and_leaves_no_temporary_snapshot";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(1);
    let base_path = pool.path("base.img");
    random_file(&base_path, 4 * MIB as u64, 11);
    let base = std::fs::read(&base_path).unwrap();
    pool.add_image("base", &base_path, 1);
    pool.ok(&[
        "volume", "create", "v", "--image", "base", "--size", "8388608",
    ]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/v");
    assert!(poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || path.exists()
    ));

    let write = |offset: usize, data: &[u8]| {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(data, offset as u64).unwrap();
        file.sync_all().unwrap();
    };
    write(100_000, &[0xAB; 300_000]);
    write(6 * MIB, &[0xCD; 3 * BLOCK]);
    write(2 * MIB, &[0; 2 * BLOCK]);
    wait_closed(&pool);
    pool.ok(&["snapshot", "create", "v@s1"]);
    // Scattered blocks after the snapshot: only they cross in an incremental.
    for i in 0..8 {
        write(i * 512 * 1024 + 8 * BLOCK, &[i as u8 + 1; BLOCK]);
    }
    wait_closed(&pool);
    pool.ok(&["snapshot", "create", "v@s2"]);
    let snapshot =
        |name: &str| std::fs::read(mount.mountpoint.join("snapshots/v").join(name)).unwrap();
    let (s1, s2) = (snapshot("s1"), snapshot("s2"));
    wait_closed(&pool);

    // No mount has the volume open: read under its writer lock.
    let (summary, stream) = sent(&pool, &["v@s2", "--from-all"]);
    assert_eq!(summary["through_mount"], false, "{summary}");
    assert_eq!(summary["bytes"], stream.len() as u64);
    let (header, contents) = apply(&stream, base.clone());
    let names: Vec<&str> = header["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_eq!(header["base_image"]["name"], "base");
    assert!(
        contents[0] == s1 && contents[1] == s2,
        "the snapshots apply as they read"
    );

    let (summary, stream) = sent(&pool, &["v@s2", "--from", "s1"]);
    assert_eq!(summary["data_bytes"], 8 * BLOCK as u64, "{summary}");
    let (_, contents) = apply(&stream, s1.clone());
    assert!(contents == [s2.clone()]);

    // The volume open through the mount: read through its snapshot files, the live state in
    // a temporary snapshot.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&[0xEE; BLOCK], 7 * MIB as u64).unwrap();
    file.sync_all().unwrap();
    let (summary, stream) = sent(&pool, &["v", "--from", "s2"]);
    assert_eq!(summary["through_mount"], true, "{summary}");
    let temporary = summary["temporary_snapshot"].as_str().unwrap().to_string();
    assert!(temporary.starts_with("copy-tmp-"), "{summary}");
    let (header, contents) = apply(&stream, s2.clone());
    assert_eq!(header["snapshots"][0]["temporary"], true, "{header}");
    assert_eq!(header["from"]["name"], "s2");
    let mut now = vec![0u8; 8 * MIB];
    file.read_exact_at(&mut now, 0).unwrap();
    assert!(contents == [now], "the live volume as sent");
    assert_eq!(
        pool.snapshot_names("v"),
        ["s1", "s2"],
        "the temporary snapshot is gone"
    );

    // A reader that goes away: the send fails, and its temporary snapshot goes all the same.
    let mut child = pool
        .command(&["send", "v", "--from-all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 100];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut head).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reader went away"));
    assert_eq!(pool.snapshot_names("v"), ["s1", "s2"]);

    // A send stopped by SIGTERM while its reader waits: it deletes its temporary snapshot.
    let mut stopped = ChildGuard(Some(
        pool.command(&["send", "v", "--from-all"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    assert!(poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || { pool.snapshot_names("v").len() == 3 }
    ));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stopped.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let child = stopped.0.take().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by a signal"));
    assert_eq!(pool.snapshot_names("v"), ["s1", "s2"]);

    // A send killed: its temporary snapshot is deleted by the next send of the volume.
    let mut killed = ChildGuard(Some(
        pool.command(&["send", "v", "--from-all"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    assert!(poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || { pool.snapshot_names("v").len() == 3 }
    ));
    killed.kill_9();
    assert_eq!(pool.snapshot_names("v").len(), 3, "a kill -9 leaves it");
    sent(&pool, &["v@s1"]);
    assert_eq!(pool.snapshot_names("v"), ["s1", "s2"]);

    // With no mount holding the volume, the next start (a command that changes the pool,
    // `recover`) deletes it too.
    drop(file);
    wait_closed(&pool);
    let mut killed = ChildGuard(Some(
        pool.command(&["send", "v", "--from-all"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    assert!(poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || { pool.snapshot_names("v").len() == 3 }
    ));
    killed.kill_9();
    assert_eq!(pool.snapshot_names("v").len(), 3, "a kill -9 leaves it");
    pool.ok(&["gc"]);
    assert_eq!(pool.snapshot_names("v"), ["s1", "s2"]);
    mount.unmount();
}

/// What `tests/sendrecv.rs` does not cover: the live volume with an unknown `--from` (no
/// temporary snapshot is taken), a bad token, and standard output on a terminal.
#[test]
fn bad_sends_fail_with_one_line_and_write_nothing() {
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "v", "--size", "1048576"]);
    pool.ok(&["snapshot", "create", "v@a"]);
    pool.ok(&["snapshot", "create", "v@b"]);
    for (args, expected) in [
        (vec!["v", "--from", "nope"], "no snapshot 'nope'"),
        (
            vec!["v", "--from-all", "--from", "nope"],
            "no snapshot 'nope'",
        ),
        (
            vec!["v@b", "--from-all", "--from", "nope"],
            "no snapshot 'nope'",
        ),
        (vec!["--resume", "garbage"], "not a resume token"),
    ] {
        let (code, stderr, stream) = send(&pool, &args);
        assert_eq!(code, Some(1), "send {args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "send {args:?}: {stderr}");
        assert!(stderr.contains(expected), "send {args:?}: {stderr}");
        assert!(
            stream.is_empty(),
            "send {args:?} wrote {} bytes",
            stream.len()
        );
    }
    // `script` gives the command a terminal for its standard output.
    let out = std::process::Command::new("script")
        .args([
            "-qec",
            &format!("{BIN} send v@a; echo exit=$?"),
            "/dev/null",
        ])
        .env("IMGPOOL_STATE_DIR", &pool.state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("standard output is a terminal"), "{text}");
    assert!(text.contains("exit=1"), "{text}");
    assert!(!text.contains("IMGPSTR1"), "{text}");
    assert_eq!(
        pool.snapshot_names("v"),
        ["a", "b"],
        "nothing was left behind"
    );
}
