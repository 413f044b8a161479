//! Mounting and unmounting under pressure: mounts of one pool started at once, `umount` of a
//! path that is not a whole mount of this pool, daemons killed with -9, out-of-range options,
//! and what a clean unmount writes to the log. Real mounts and real processes throughout.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const MIB: u64 = 1 << 20;

/// How many entries of the mount table sit at exactly `path` (stacked mounts count each).
fn mounts_at(path: &Path) -> usize {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    table
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(path))
        .count()
}

/// A guard for a mount the test is about to make at `<pool dir>/<name>` (created unless it is
/// there, maybe as a dead mount); its pid is filled in once the mount is up.
fn guard_for(pool: &TestPool, name: &str) -> MountGuard {
    let mountpoint = pool.path(name);
    if let Err(e) = fs::create_dir(&mountpoint) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::AlreadyExists,
            "{mountpoint:?}"
        );
    }
    MountGuard {
        state: pool.state.clone(),
        mountpoint,
        disks: pool.disks.clone(),
        pid: None,
    }
}

/// The pid of the daemon `status` lists at `mountpoint`.
fn daemon_at(pool: &TestPool, mountpoint: &Path) -> Option<i32> {
    let status = pool.json(&["status"]);
    status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountpoint"].as_str() == mountpoint.to_str())
        .map(|m| m["pid"].as_i64().unwrap() as i32)
}

/// Mounts the pool at `<pool dir>/<name>` with `extra` options; the guard unmounts it.
fn mount_in(pool: &TestPool, name: &str, extra: &[&str]) -> MountGuard {
    let mut guard = guard_for(pool, name);
    let mut args = vec!["mount", guard.mountpoint.to_str().unwrap()];
    args.extend_from_slice(extra);
    pool.ok(&args);
    guard.pid = daemon_at(pool, &guard.mountpoint);
    assert!(guard.pid.is_some(), "status lists no daemon at {name}");
    guard
}

/// Whether `path` is a FUSE mount whose daemon is gone.
fn is_dead(path: &Path) -> bool {
    fs::metadata(path).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)
}

fn kill_9(mount: &mut MountGuard) {
    kill(Pid::from_raw(mount.pid.unwrap()), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !mount.daemon_alive()),
        "the daemon survived SIGKILL"
    );
    mount.pid = None;
}

/// A pool with two disks holding one 1 MiB image; returns the pool, its uuid and the sha512.
fn pool_with_image(seed: u64) -> (TestPool, String, String) {
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, MIB, seed);
    let uuid = pool.add_image("golden", &source, 1);
    let sha = sha512sum(&source);
    (pool, uuid, sha)
}

/// The pool at `mount` serves the image through the mount and through every disk's bind.
fn assert_serves(mount: &MountGuard, uuid: &str, sha: &str, after: &str) {
    assert_eq!(
        sha512sum(&mount.image("golden")),
        sha,
        "{after}: images/golden"
    );
    for disk in &mount.disks {
        assert_eq!(
            sha512sum(&mount.bound_view(disk, "golden", uuid)),
            sha,
            "{after}: the bind of {disk:?}"
        );
    }
}

/// `status` says the pool is healthy, with exactly the mounts at `mountpoints` and no dead one.
fn assert_status_true(pool: &TestPool, mountpoints: &[&Path], after: &str) {
    let status = pool.json(&["status"]);
    assert_eq!(status["health"], "ok", "{after}: {status}");
    assert_eq!(
        status["dead_mounts"].as_array().map(Vec::len),
        Some(0),
        "{after}: {status}"
    );
    let mut listed: Vec<String> = status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountpoint"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut expected: Vec<String> = mountpoints
        .iter()
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    expected.sort();
    assert_eq!(listed, expected, "{after}: {status}");
}

/// Unmounts everything stacked at its paths when dropped (a `MountGuard` unmounts one layer),
/// so that a failed race leaves nothing mounted behind.
struct Unstack(Vec<PathBuf>);

impl Drop for Unstack {
    fn drop(&mut self) {
        for path in &self.0 {
            for _ in 0..8 {
                if !is_mount_point(path) {
                    break;
                }
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(path)
                    .status();
            }
        }
    }
}

/// A service manager starting the mount twice, or an operator and a script at once: several
/// `imgpool mount` of one pool at one mount point started together. Exactly one mounts; the
/// others fail and leave the winner's mount and binds serving (before the mount lock, a loser
/// mounted on top of the winner, failed at the binds and unmounted the winner's mount by path).
#[test]
fn mounts_started_at_once_leave_exactly_one_serving() {
    if !can_mount("mounts_started_at_once_leave_exactly_one_serving") {
        return;
    }
    const RACERS: usize = 4;
    let (pool, uuid, sha) = pool_with_image(200);
    for round in 0..3 {
        let mut mount = guard_for(&pool, "mnt");
        let _unstack = Unstack(mount.targets());
        let mnt = mount.mountpoint.to_str().unwrap().to_string();
        let racers: Vec<ChildGuard> = (0..RACERS)
            .map(|_| {
                ChildGuard(Some(
                    pool.command(&["mount", &mnt])
                        .stdin(Stdio::null())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap(),
                ))
            })
            .collect();
        let outputs: Vec<Output> = racers
            .into_iter()
            .map(|mut racer| racer.0.take().unwrap().wait_with_output().unwrap())
            .collect();
        mount.pid = daemon_at(&pool, &mount.mountpoint);
        let winners = outputs.iter().filter(|o| o.status.success()).count();
        assert_eq!(
            winners,
            1,
            "round {round}: {winners} of {RACERS} mounts succeeded: {:?}",
            outputs
                .iter()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .collect::<Vec<_>>()
        );
        for loser in outputs.iter().filter(|o| !o.status.success()) {
            let message = failed_cleanly(&format!("round {round}: a mount that lost"), loser);
            assert!(
                message.contains("already a mount point"),
                "round {round}: {message}"
            );
        }
        assert_eq!(mounts_at(&mount.mountpoint), 1, "round {round}: stacked");
        for target in mount.targets() {
            assert_eq!(mounts_at(&target), 1, "round {round}: {target:?}");
        }
        assert_serves(&mount, &uuid, &sha, &format!("round {round}"));
        assert_status_true(&pool, &[&mount.mountpoint], &format!("round {round}"));
        assert!(mount.daemon_alive(), "round {round}: the winner's daemon");
        mount.unmount();
    }
}

/// `umount` unmounts what the path names: a disk's bind is refused (it goes with its mount, and
/// the message says which command does that), and so is a mount of another pool.
#[test]
fn umount_unmounts_only_a_whole_mount_of_its_own_pool() {
    if !can_mount("umount_unmounts_only_a_whole_mount_of_its_own_pool") {
        return;
    }
    let (pool, uuid, sha) = pool_with_image(210);
    let other = TestPool::new(1);
    let mount = pool.mount();
    let mnt = mount.mountpoint.to_str().unwrap().to_string();
    let bind = pool.disks[0].join("backing-images");

    let message = pool.fails(&["umount", bind.to_str().unwrap()]);
    assert!(
        message.contains("bind mount of disk 'd1'")
            && message.contains(&format!("`imgpool umount {mnt}`")),
        "umount of a bind: {message}"
    );
    for (args, what) in [
        (vec!["umount", &mnt], "another pool's umount of the mount"),
        (
            vec!["umount", bind.to_str().unwrap()],
            "another pool's umount of a bind",
        ),
        (
            vec!["umount", "--lazy", &mnt],
            "another pool's umount --lazy",
        ),
    ] {
        let message = other.fails(&args);
        assert!(message.contains("another pool"), "{what}: {message}");
    }
    for target in mount.targets() {
        assert!(is_mount_point(&target), "{target:?} was unmounted");
    }
    assert!(mount.daemon_alive());
    assert_serves(&mount, &uuid, &sha, "after the refused umounts");
    assert_status_true(&pool, &[&mount.mountpoint], "after the refused umounts");
    mount.unmount();
}

/// After `kill -9` of a daemon its mount and binds answer ENOTCONN to every replica. `status`
/// says so and what to do; the next `mount`, elsewhere or at the same place, unmounts them
/// (only this pool's: another pool's dead mount stays until that pool acts) and serves again.
#[test]
fn a_killed_daemon_is_reported_and_cleaned_up_by_the_next_mount() {
    if !can_mount("a_killed_daemon_is_reported_and_cleaned_up_by_the_next_mount") {
        return;
    }
    let (pool, uuid, sha) = pool_with_image(220);
    let other = TestPool::new(1);
    let mut other_mount = mount_in(&other, "other-mnt", &["--no-bind"]);
    kill_9(&mut other_mount);

    let mut first = pool.mount();
    assert_serves(&first, &uuid, &sha, "before the kill");
    kill_9(&mut first);
    for target in first.targets() {
        assert!(
            wait_until(Duration::from_secs(5), || is_dead(&target)),
            "{target:?} is not a dead mount after kill -9"
        );
    }
    let status = pool.json(&["status"]);
    assert_eq!(status["health"], "degraded", "{status}");
    let mut dead: Vec<String> = status["dead_mounts"]
        .as_array()
        .unwrap_or_else(|| panic!("no dead_mounts: {status}"))
        .iter()
        .map(|m| m["path"].as_str().unwrap().to_string())
        .collect();
    dead.sort();
    let mut expected: Vec<String> = first
        .targets()
        .iter()
        .map(|t| t.to_str().unwrap().to_string())
        .collect();
    expected.sort();
    assert_eq!(dead, expected, "only this pool's dead mounts: {status}");
    let text = pool.ok(&["status"]);
    assert!(
        text.contains("health:  degraded")
            && text.contains(&format!(
                "mount {}: its daemon died",
                first.mountpoint.display()
            ))
            && text.contains("`imgpool mount"),
        "{text}"
    );

    // Elsewhere: the dead mount and binds go, the binds serve from the new mount.
    let mut second = mount_in(&pool, "mnt2", &[]);
    first.disks.clear(); // the binds are the second mount's now
    assert!(!is_mount_point(&first.mountpoint), "the dead mount stayed");
    for target in second.targets() {
        assert_eq!(mounts_at(&target), 1, "{target:?}");
    }
    assert_serves(&second, &uuid, &sha, "a mount elsewhere after kill -9");
    assert_status_true(
        &pool,
        &[&second.mountpoint],
        "a mount elsewhere after kill -9",
    );
    assert!(
        is_dead(&other_mount.mountpoint),
        "another pool's dead mount was touched"
    );
    assert_eq!(
        other.json(&["status"])["dead_mounts"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let message = pool.fails(&["mount", other_mount.mountpoint.to_str().unwrap()]);
    assert!(
        message.contains("daemon died") && message.contains("imgpool umount"),
        "a mount at another pool's dead mount: {message}"
    );
    assert!(is_dead(&other_mount.mountpoint));

    // At the same place.
    kill_9(&mut second);
    let third = mount_in(&pool, "mnt2", &[]);
    second.disks.clear();
    second.mountpoint = PathBuf::new();
    for target in third.targets() {
        assert_eq!(mounts_at(&target), 1, "{target:?}");
    }
    assert_serves(
        &third,
        &uuid,
        &sha,
        "a mount at the same place after kill -9",
    );
    assert_status_true(&pool, &[&third.mountpoint], "the same place after kill -9");
    third.unmount();

    other.ok(&["umount", other_mount.mountpoint.to_str().unwrap()]);
    assert!(!is_mount_point(&other_mount.mountpoint));
}

/// Every numeric option of `mount` is bounded with a message naming the range (`--threads
/// 100000` hung the mount until kill -9), and the bounds themselves work.
#[test]
fn numeric_mount_options_are_bounded_and_their_bounds_work() {
    if !can_mount("numeric_mount_options_are_bounded_and_their_bounds_work") {
        return;
    }
    let (pool, uuid, sha) = pool_with_image(230);
    let mountpoint = pool.path("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    let mnt = mountpoint.to_str().unwrap();
    for (option, value, range) in [
        ("--threads", "100000", "from 1 to 256"),
        ("--threads", "0", "from 1 to 256"),
        ("--cache-size", "1024T", "memory"),
        ("--read-ahead", "1GiB", "from 0 to 256"),
    ] {
        let mut guard = guard_for(&pool, "mnt");
        let mut command = ChildGuard(Some(
            pool.command(&["mount", mnt, option, value])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        let mut stderr_pipe = command.0.as_mut().unwrap().stderr.take().unwrap();
        let exit = command.wait_timeout(Duration::from_secs(30));
        guard.pid = daemon_at(&pool, &mountpoint);
        let Some(exit) = exit else {
            panic!("mount {option} {value} still runs after 30 s");
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut stderr).unwrap();
        assert_eq!(exit.code(), Some(2), "mount {option} {value}: {stderr}");
        assert!(stderr.contains(range), "mount {option} {value}: {stderr}");
        assert!(
            !is_mount_point(&mountpoint),
            "mount {option} {value} mounted"
        );
    }
    for extra in [
        &["--threads", "256", "--read-ahead", "256MiB"][..],
        &[
            "--threads",
            "1",
            "--read-ahead",
            "0",
            "--cache-size",
            "4MiB",
        ][..],
    ] {
        let mount = pool.mount_with(extra);
        assert_serves(&mount, &uuid, &sha, &format!("mount {extra:?}"));
        mount.unmount();
    }
}

/// A clean unmount (by `imgpool umount` and by SIGTERM) logs nothing that looks like trouble.
#[test]
fn a_clean_unmount_logs_no_warning() {
    if !can_mount("a_clean_unmount_logs_no_warning") {
        return;
    }
    let (pool, uuid, sha) = pool_with_image(240);
    let log = pool.path("daemon.log");
    let log_arg = ["--log-file", log.to_str().unwrap()];
    let mount = pool.mount_with(&log_arg);
    assert_serves(&mount, &uuid, &sha, "a mount with a log");
    mount.unmount();
    let mount = pool.mount_with(&log_arg);
    assert_serves(&mount, &uuid, &sha, "a mount with a log");
    kill(Pid::from_raw(mount.pid.unwrap()), Signal::SIGTERM).unwrap();
    assert!(wait_until(Duration::from_secs(10), || !mount.daemon_alive()));
    drop(mount);
    let text = fs::read_to_string(&log).unwrap();
    let alarming: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(alarming.is_empty(), "a clean unmount logged: {alarming:#?}");
    assert!(text.contains("unmounted"), "{text}");
}
