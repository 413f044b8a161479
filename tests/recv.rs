//! `imgpool recv` as a process, fed with streams of the tests' own encoder
//! (`common::stream`). A `recv` killed with `kill -9`
//! mid-stream is undone by the next command that changes the pool (or, resumable, is resumed
//! from where it stopped); a volume that a mount has open is refused, and one with a partial
//! receive is not served by the mount.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::stream::{digest, StreamBuilder, GRANULE};
use common::*;
use serde_json::{json, Value};
/// 4 MiB: 64 granules.
const SIZE: usize = 64 * GRANULE;

/// The bytes of a granule of snapshot `seed`, all different.
fn granule_bytes(seed: u64, granule: usize) -> Vec<u8> {
    let mut out = vec![0u8; GRANULE];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let word = seed * 1_000_003 + granule as u64 * 65_537 + i as u64 + 1;
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// The contents of the sender's snapshots s1..s5 (no base image: zeros where never written),
/// each changing a range of granules of the one before.
fn contents() -> Vec<Vec<u8>> {
    let ranges = [(0, 32), (16, 48), (40, 64), (0, 8), (8, 24)];
    let mut content = vec![0u8; SIZE];
    let mut out = Vec::new();
    for (n, (first, end)) in ranges.iter().enumerate() {
        for g in *first..*end {
            content[g * GRANULE..(g + 1) * GRANULE]
                .copy_from_slice(&granule_bytes(n as u64 + 1, g));
        }
        out.push(content.clone());
    }
    out
}

fn snapshot_json(n: usize) -> Value {
    json!({
        "name": format!("s{}", n + 1),
        "guid": format!("guid-s{}", n + 1),
        "created": 1_700_000_000 + n as i64,
        "size": SIZE,
        "temporary": false,
    })
}

/// The package of snapshots `snaps` (indices into `contents`) after `from` (none: whole),
/// from `resume` (snapshots done, next granule) when resumed.
fn package(
    id: &str,
    from: Option<usize>,
    snaps: std::ops::Range<usize>,
    resume: Option<(usize, usize)>,
) -> Vec<u8> {
    let all = contents();
    let header = json!({
        "package": id,
        "volume": "src",
        "volume_uuid": "src-uuid",
        "base_image": null,
        "from": from.map(snapshot_json),
        "snapshots": snaps.clone().map(snapshot_json).collect::<Vec<_>>(),
        "from_all": snaps.len() > 1,
        "with_image": false,
        "resume": resume.map(|(done, granule)| json!({ "done": done, "granule": granule })),
    });
    let mut s = StreamBuilder::default();
    s.header(&header);
    let (done, skip) = resume.unwrap_or((0, 0));
    let mut prev = from.map_or(vec![0u8; SIZE], |f| all[f].clone());
    for (index, n) in snaps.enumerate() {
        let content = &all[n];
        let old = std::mem::replace(&mut prev, content.clone());
        if index < done {
            continue;
        }
        s.begin(index as u32, SIZE as u64);
        let first = if index == done { skip } else { 0 };
        for g in first..SIZE / GRANULE {
            let range = g * GRANULE..(g + 1) * GRANULE;
            if content[range.clone()] != old[range.clone()] {
                s.data(range.start as u64, &content[range]);
            }
        }
        s.end_snapshot(index as u32, &digest(content));
    }
    s.end()
}

/// `imgpool recv ARGS` with `input` on its standard input.
fn recv(pool: &TestPool, args: &[&str], input: &[u8]) -> Output {
    let mut all = vec!["recv"];
    all.extend_from_slice(args);
    let mut child = pool
        .command(&all)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A receiver that refuses early closes its input: the rest is not wanted.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

fn received(pool: &TestPool, volume: &str, input: &[u8]) -> Value {
    let out = recv(pool, &[volume, "--json"], input);
    assert!(
        out.status.success(),
        "recv {volume} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `recv` of `stream` that has read its first `fed` bytes, and waits for more.
fn stalled_recv(pool: &TestPool, args: &[&str], stream: &[u8], fed: usize) -> ChildGuard {
    let mut all = vec!["recv"];
    all.extend_from_slice(args);
    let mut child = pool
        .command(&all)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(&stream[..fed]).unwrap();
    // Kept open (leaked into a thread that never writes): the receiver waits for the rest.
    std::thread::spawn(move || {
        let _open = input;
        std::thread::sleep(Duration::from_secs(600));
    });
    ChildGuard(Some(child))
}

/// Where a volume's receive state would be, for any volume on `disk`.
fn receive_states(disk: &Path) -> Vec<std::path::PathBuf> {
    let dir = disk.join(".imgpool/volumes");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("receive.json"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default()
}

/// Offset in `stream` just past the `n`th data record of its snapshot `index` (by scanning
/// the records).
fn past_data_of(stream: &[u8], index: u32, n: usize) -> usize {
    let mut at = 8;
    let mut in_snapshot = None;
    let mut seen = 0;
    while at < stream.len() {
        let kind = stream[at];
        let len = u32::from_le_bytes(stream[at + 9..at + 13].try_into().unwrap()) as usize;
        let payload = &stream[at + 13..at + 13 + len];
        at += 13 + len + 4;
        match kind {
            4 => in_snapshot = Some(u32::from_le_bytes(payload[..4].try_into().unwrap())),
            5 if in_snapshot == Some(index) => {
                seen += 1;
                if seen == n {
                    return at;
                }
            }
            _ => {}
        }
    }
    panic!("snapshot {index} has fewer than {n} data records");
}

#[test]
fn a_killed_recv_is_undone_by_the_next_command_and_a_resumable_one_resumes() {
    let pool = TestPool::new(1);
    let whole = package("p1", None, 0..1, None);
    let got = received(&pool, "v", &whole);
    assert_eq!(got["created"], json!(true));
    assert_eq!(got["snapshots"], json!(["s1"]));
    assert_eq!(got["bytes"], json!(whole.len()));

    // Killed in the middle of the second snapshot of an incremental package.
    let inc = package("p2", Some(0), 1..3, None);
    let mut child = stalled_recv(&pool, &["v"], &inc, past_data_of(&inc, 1, 4));
    assert!(
        wait_until(Duration::from_secs(20), || pool.snapshot_names("v").len()
            == 2),
        "the first snapshot of the package was not staged"
    );
    assert!(pool.snapshot_names("v")[1].starts_with("recv-tmp-"));
    child.kill_9();
    pool.ok(&["repair"]);
    assert_eq!(pool.snapshot_names("v"), vec!["s1"]);
    assert!(receive_states(&pool.disks[0]).is_empty());
    // The digests of the whole package prove the volume was back at s1, byte for byte.
    let got = received(&pool, "v", &inc);
    assert_eq!(got["snapshots"], json!(["s2", "s3"]));

    // Resumable: killed in the second snapshot, resumed after the first.
    let more = package("p3", Some(2), 3..5, None);
    let mut child = stalled_recv(
        &pool,
        &["v", "--resumable"],
        &more,
        past_data_of(&more, 1, 3),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        pool.snapshot_names("v").len() == 4
    }));
    child.kill_9();
    pool.ok(&["repair"]);
    assert!(
        !receive_states(&pool.disks[0]).is_empty(),
        "recover dropped a resumable receive"
    );
    let line = recv(&pool, &["v"], &package("p3", Some(2), 3..5, None));
    assert!(!line.status.success());
    let error = String::from_utf8_lossy(&line.stderr);
    assert!(
        error.contains("--resume-token") && error.contains("--abort"),
        "{error}"
    );
    let token = pool.ok(&["recv", "--resume-token", "v"]);
    assert_eq!(token.lines().count(), 1);
    let hex = token.trim().strip_prefix("imgpool-resume-1-").unwrap();
    let token: Value = serde_json::from_slice(&hex::decode(hex).unwrap()).unwrap();
    assert_eq!(token["package"], json!("p3"));
    assert_eq!(token["volume_uuid"], json!("src-uuid"));
    assert_eq!(token["from"], json!("guid-s3"));
    assert_eq!(token["to"], json!("guid-s5"));
    assert_eq!(token["point"]["done"], json!(1));
    let granule = token["point"]["granule"].as_u64().unwrap() as usize;
    let resumed = package("p3", Some(2), 3..5, Some((1, granule)));
    let got = received(&pool, "v", &resumed);
    assert_eq!(got["resumed"], json!(true));
    assert_eq!(got["snapshots"], json!(["s4", "s5"]));
    assert_eq!(pool.snapshot_names("v"), vec!["s1", "s2", "s3", "s4", "s5"]);
    assert!(receive_states(&pool.disks[0]).is_empty());

    // A new volume, killed: removed by the next command, and received again whole.
    let whole = package("p4", None, 0..2, None);
    let mut child = stalled_recv(&pool, &["w"], &whole, past_data_of(&whole, 1, 2));
    assert!(wait_until(Duration::from_secs(20), || {
        receive_states(&pool.disks[0]).len() == 1
    }));
    std::thread::sleep(Duration::from_millis(200));
    child.kill_9();
    let listed = pool.json(&["volume", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    pool.ok(&["repair"]);
    assert!(receive_states(&pool.disks[0]).is_empty());
    let got = received(&pool, "w", &whole);
    assert_eq!(got["snapshots"], json!(["s1", "s2"]));
}

#[test]
fn bad_streams_fail_with_one_line_and_change_nothing() {
    let pool = TestPool::new(1);
    received(&pool, "v", &package("p1", None, 0..1, None));
    let inc = package("p2", Some(0), 1..3, None);
    let mut flipped = inc.clone();
    let at = inc.len() / 2;
    flipped[at] ^= 1;
    for (what, args, input) in [
        ("a flipped byte", vec!["v"], flipped),
        ("a cut", vec!["v"], inc[..inc.len() - 3].to_vec()),
        ("not a stream", vec!["v"], b"hello".to_vec()),
        (
            "a whole stream onto it",
            vec!["v"],
            package("p3", None, 0..1, None),
        ),
        (
            "an incremental onto a missing volume",
            vec!["nope"],
            inc.clone(),
        ),
    ] {
        let out = recv(&pool, &args, &input);
        let line = failed_cleanly(what, &out);
        assert!(!line.is_empty(), "{what}");
        assert_eq!(pool.snapshot_names("v"), vec!["s1"], "{what}");
    }
    assert_eq!(pool.json(&["volume", "list"]).as_array().unwrap().len(), 1);
    assert!(pool
        .fails(&["recv", "--abort", "v"])
        .contains("no partial receive"));
    received(&pool, "v", &inc);
}

#[test]
fn a_volume_open_through_the_mount_is_refused_and_a_partial_one_is_not_served() {
    if !can_mount("a_volume_open_through_the_mount_is_refused_and_a_partial_one_is_not_served") {
        return;
    }
    let pool = TestPool::new(1);
    received(&pool, "v", &package("p1", None, 0..1, None));
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/v");
    let inc = package("p2", Some(0), 1..2, None);
    {
        let _open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let out = recv(&pool, &["v"], &inc);
        let line = failed_cleanly("recv onto an open volume", &out);
        assert!(
            line.contains("close it there") && line.contains("retry"),
            "{line}"
        );
    }
    // The daemon lets go of the volume a moment after its last close.
    let mut out = recv(&pool, &["v", "--resumable"], &inc[..inc.len() / 2]);
    for _ in 0..50 {
        if String::from_utf8_lossy(&out.stderr).contains("--resume-token") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        out = recv(&pool, &["v", "--resumable"], &inc[..inc.len() / 2]);
    }
    let line = failed_cleanly("a cut resumable stream", &out);
    assert!(line.contains("--resume-token"), "{line}");
    let error = std::fs::File::open(&path).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EBUSY), "{error}");
    pool.ok(&["recv", "--abort", "v"]);
    std::fs::File::open(&path).unwrap();
    drop(mount);
}

#[test]
fn a_cut_resumable_receive_goes_on_with_the_rest_that_send_resume_sends() {
    let test = "a_cut_resumable_receive_goes_on_with_the_rest_that_send_resume_sends";
    if !can_mount(test) {
        return;
    }
    let here = TestPool::new(1);
    let there = TestPool::new(1);
    here.ok(&["volume", "create", "v", "--size", &SIZE.to_string()]);
    let mount_here = here.mount();
    let mount_there = there.mount();
    let path = mount_here.mountpoint.join("volumes/v");
    for (n, content) in contents().iter().take(3).enumerate() {
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, content, 0).unwrap();
        drop(file);
        wait_closed(&here, "v");
        here.ok(&["snapshot", "create", &format!("v@s{}", n + 1)]);
    }
    let full = here.path("full");
    let out = here
        .command(&["send", "v@s3", "--from-all"])
        .stdout(std::fs::File::create(&full).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stream = std::fs::read(&full).unwrap();
    // Cut in the third snapshot: the first two are kept.
    let out = recv(
        &there,
        &["w", "--resumable"],
        &stream[..past_data_of(&stream, 2, 2)],
    );
    failed_cleanly("a cut resumable receive", &out);
    let token = there.ok(&["recv", "--resume-token", "w"]);
    let rest = here.path("rest");
    let out = here
        .command(&["send", "--resume", token.trim()])
        .stdout(std::fs::File::create(&rest).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rest = std::fs::read(&rest).unwrap();
    assert!(
        rest.len() < stream.len() / 2,
        "the resumed stream sends again what was kept"
    );
    let got = received(&there, "w", &rest);
    assert_eq!(got["resumed"], json!(true));
    assert_eq!(got["snapshots"], json!(["s1", "s2", "s3"]));
    for (n, content) in contents().iter().take(3).enumerate() {
        let name = format!("snapshots/w/s{}", n + 1);
        assert!(
            read_mounted(&mount_there.mountpoint.join(&name)) == *content,
            "{name} differs"
        );
    }
    assert!(read_mounted(&mount_there.mountpoint.join("volumes/w")) == contents()[2]);
    wait_closed(&there, "w");
    mount_there.unmount();
    mount_here.unmount();
}

/// A pseudo-terminal of 120 columns: (the side a test reads, the side a child writes).
fn pseudo_terminal() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut reader, mut writer) = (0, 0);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: both descriptors are written by openpty before it returns 0, and owned here.
    unsafe {
        assert_eq!(
            libc::openpty(
                &mut reader,
                &mut writer,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size
            ),
            0,
            "openpty: {}",
            std::io::Error::last_os_error()
        );
        (
            std::fs::File::from_raw_fd(reader),
            std::os::fd::OwnedFd::from_raw_fd(writer),
        )
    }
}

#[test]
fn progress_goes_to_a_terminal_on_standard_error_and_nowhere_else() {
    let pool = TestPool::new(1);
    let stream = package("p1", None, 0..3, None);
    let file = pool.path("stream");
    std::fs::write(&file, &stream).unwrap();
    let (mut terminal, child_side) = pseudo_terminal();
    let mut child = ChildGuard(Some(
        pool.command(&["recv", "v"])
            .stdin(std::fs::File::open(&file).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::from(child_side))
            .spawn()
            .unwrap(),
    ));
    // Read while it runs (a full terminal would stop it), until its side closes: EIO once
    // the child is gone, or killed by the guard.
    let reading = std::thread::spawn(move || {
        let mut shown = Vec::new();
        let _ = std::io::Read::read_to_end(&mut terminal, &mut shown);
        shown
    });
    let status = child.wait_timeout(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "recv: {status:?}");
    let shown = reading.join().unwrap();
    let shown = String::from_utf8_lossy(&shown);
    assert!(
        shown.contains(" read, ") && shown.contains(" of 3"),
        "no progress on the terminal: {shown:?}"
    );
    // A pipe gets the result alone.
    let out = recv(&pool, &["w"], &stream);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A whole stream that replaces a volume (`recv --force`) holds the old volume from its first
/// check to its removal: an open of it through the mount is refused (EBUSY), so is `volume
/// rm`, and a snapshot taken meanwhile waits and lands on the new volume. A volume open
/// through the mount is not replaced, and a replacing receive is not resumable.
#[test]
fn a_replacing_receive_holds_the_old_volume_and_commands_wait_for_it_or_are_refused() {
    let test = "a_replacing_receive_holds_the_old_volume_and_commands_wait_for_it_or_are_refused";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "v", "--size", &SIZE.to_string()]);
    pool.ok(&["snapshot", "create", "v@mine"]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/v");
    let whole = package("p1", None, 0..3, None);
    {
        let _open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let line = failed_cleanly(
            "a replace of an open volume",
            &recv(&pool, &["v", "--force"], &whole),
        );
        assert!(
            line.contains("close it there") && line.contains("retry"),
            "{line}"
        );
    }
    let line = failed_cleanly("a whole stream onto v", &recv(&pool, &["v"], &whole));
    assert!(line.contains("--force"), "{line}");
    let line = failed_cleanly(
        "a resumable replace",
        &recv(&pool, &["v", "--force", "--resumable"], &whole),
    );
    assert!(line.contains("cannot be resumable"), "{line}");
    assert_eq!(pool.snapshot_names("v"), ["mine"]);

    // Stalled after a part of its second snapshot.
    wait_closed(&pool, "v");
    let fed = past_data_of(&whole, 1, 4);
    let mut receiver = ChildGuard(Some(
        pool.command(&["recv", "v", "--force", "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut input = receiver.0.as_mut().unwrap().stdin.take().unwrap();
    input.write_all(&whole[..fed]).unwrap();
    let pid = receiver.pid();
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(20), || {
            pool.json(&["volume", "show", "v"])["open_by_pid"] == json!(pid)
        }),
        "the receive does not hold the old volume"
    );
    let error = std::fs::File::open(&path).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EBUSY), "{error}");
    let line = failed_cleanly(
        "volume rm during a replace",
        &pool.run(&["volume", "rm", "--recursive", "v"]),
    );
    assert!(line.contains("retry once that command is done"), "{line}");
    let mut snapshot = ChildGuard(Some(
        pool.command(&["snapshot", "create", "v@later"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        snapshot.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "a snapshot of the held volume did not wait"
    );
    // Only the old volume is there meanwhile, as it was.
    let names: Vec<Value> = pool.json(&["volume", "list"]).as_array().unwrap().clone();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(pool.snapshot_names("v"), ["mine"]);

    input.write_all(&whole[fed..]).unwrap();
    drop(input);
    let out = receiver.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["replaced"], json!(true), "{got}");
    assert_eq!(got["discarded"]["snapshots"], json!(["mine"]), "{got}");
    let out = snapshot.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the waiting snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pool.snapshot_names("v"), ["s1", "s2", "s3", "later"]);
    assert!(read_mounted(&path) == contents()[2]);
    assert!(
        read_mounted(&mount.mountpoint.join("snapshots/v/later")) == contents()[2],
        "the snapshot taken meanwhile is not of the new volume"
    );
    let dirs = std::fs::read_dir(pool.disks[0].join(".imgpool/volumes"))
        .unwrap()
        .count();
    assert_eq!(dirs, 1, "the old volume's directory is left");
    assert!(receive_states(&pool.disks[0]).is_empty());
    pool.ok(&["fsck"]);
    drop(mount);
}
