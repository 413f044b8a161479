//! The mount daemon's control socket, through a real mount: live statistics in `status`,
//! `cache drop`, waking after a change, refusing every uid but root, replacing the socket a
//! killed daemon left, and clients that are slow or send garbage.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

const MIB: u64 = 1 << 20;
const NOBODY: u32 = 65534;

/// The one mount's entry in `status --json`.
fn mount_status(pool: &TestPool) -> Value {
    let status = pool.json(&["status"]);
    let mounts = status["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{status}");
    mounts[0].clone()
}

fn bytes_cached(pool: &TestPool) -> u64 {
    let mount = mount_status(pool);
    assert!(mount["stats_error"].is_null(), "{mount}");
    mount["stats"]["read"]["cache"]["bytes_cached"]
        .as_u64()
        .unwrap_or_else(|| panic!("no statistics: {mount}"))
}

/// The cached bytes once the cache stops filling: a sequential read also starts readahead,
/// which goes on after the reader is done.
fn settled_bytes_cached(pool: &TestPool) -> u64 {
    let mut last = bytes_cached(pool);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = bytes_cached(pool);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Reads `len` bytes of `path` with O_DIRECT: what such a reader gets stays in the chunk cache
/// (the kernel's page cache holds nothing of it).
fn read_direct(path: &Path, len: u64) {
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["of=/dev/null", "bs=64k", "iflag=direct", "status=none"])
        .arg(format!("count={}", len / (64 * 1024)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn socket_of(pool: &TestPool) -> PathBuf {
    PathBuf::from(mount_status(pool)["control_socket"].as_str().unwrap())
}

fn log_lines(pool: &TestPool) -> Vec<String> {
    fs::read_to_string(pool.state.join("mount.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A pool with one 4 MiB image, mounted (without bind mounts: they play no part here).
fn mounted(seed: u64) -> (TestPool, MountGuard) {
    let pool = TestPool::new(1);
    let source = pool.path("source.img");
    random_file(&source, 4 * MIB, seed);
    pool.add_image("golden", &source, 1);
    let mount = pool.mount_with(&["--no-bind"]);
    (pool, mount)
}

#[test]
fn status_shows_live_statistics_and_cache_drop_empties_the_cache() {
    if !can_mount("status_shows_live_statistics_and_cache_drop_empties_the_cache") {
        return;
    }
    let (pool, mount) = mounted(1);
    let mnt = mount.mountpoint.to_str().unwrap().to_string();

    // Root's socket in root's directory.
    let socket = socket_of(&pool);
    assert_eq!(socket.parent().unwrap(), pool.state.join("control"));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(fs::metadata(&socket).unwrap().uid(), 0);
    assert!(!pool.state.join("stats").exists());

    let before = mount_status(&pool);
    assert_eq!(before["stats"]["io_mode"], "cached", "{before}");
    assert_eq!(before["stats"]["mount_id"], before["id"], "{before}");
    read_direct(&mount.image("golden"), MIB);
    // Live: no waiting for a periodic write.
    let cached = settled_bytes_cached(&pool);
    assert!(
        cached >= MIB,
        "{cached} bytes cached after a 1 MiB O_DIRECT read"
    );
    let text = pool.ok(&["status"]);
    assert!(text.contains("io mode: cached"), "{text}");
    assert!(text.contains("hits"), "{text}");

    let out = pool.ok(&["cache", "drop"]);
    assert!(
        out.contains(&format!("emptied the chunk cache of {mnt}")),
        "{out}"
    );
    assert_eq!(bytes_cached(&pool), 0);

    // One mount by its path; a path that is no mount of the pool is an error.
    read_direct(&mount.image("golden"), MIB);
    assert!(settled_bytes_cached(&pool) > 0);
    let out = pool.json(&["cache", "drop", "--mountpoint", &mnt]);
    assert_eq!(out["dropped"][0]["mountpoint"], mnt.as_str(), "{out}");
    assert!(
        out["dropped"][0]["dropped_bytes"].as_u64().unwrap() > 0,
        "{out}"
    );
    assert_eq!(bytes_cached(&pool), 0);
    let elsewhere = pool.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let message = pool.fails(&["cache", "drop", "--mountpoint", elsewhere.to_str().unwrap()]);
    assert!(message.contains("no running mount"), "{message}");

    // A command that changes the pool wakes the daemon: the change is in the mount when the
    // command returns, without waiting for the daemon's poll.
    let second = pool.path("second.img");
    random_file(&second, MIB, 2);
    pool.add_image("second", &second, 1);
    assert_eq!(sha512sum(&mount.image("second")), sha512sum(&second));
    pool.ok(&["image", "rm", "second"]);
    assert!(!mount.image("second").exists());

    mount.unmount();
    assert!(!socket.exists(), "the daemon left its socket behind");
    let out = pool.ok(&["cache", "drop"]);
    assert!(out.contains("no running mount"), "{out}");
}

/// Runs imgpool as `nobody`; with CAP_DAC_OVERRIDE kept when `dac_override`, so that it gets
/// through the 0700 directory and the 0600 socket to the daemon's own check.
fn as_nobody(pool: &TestPool, dac_override: bool, args: &[&str]) -> Output {
    if dac_override {
        let uid = NOBODY.to_string();
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .args([
                "--inh-caps",
                "+dac_override",
                "--ambient-caps",
                "+dac_override",
            ])
            .arg(BIN)
            .args(args)
            .env("IMGPOOL_STATE_DIR", &pool.state)
            .env_remove("IMGPOOL_LOG");
        command.output().unwrap()
    } else {
        pool.command(args).uid(NOBODY).gid(NOBODY).output().unwrap()
    }
}

#[test]
fn only_root_may_use_the_control_socket() {
    if !can_mount("only_root_may_use_the_control_socket") {
        return;
    }
    let (pool, mount) = mounted(3);
    read_direct(&mount.image("golden"), MIB);
    let cached = settled_bytes_cached(&pool);
    assert!(cached > 0);

    // Past the directory's and the socket's rights, the daemon itself refuses the uid.
    let log_before = log_lines(&pool).len();
    let out = as_nobody(&pool, true, &["cache", "drop"]);
    let message = failed_cleanly("cache drop as nobody with CAP_DAC_OVERRIDE", &out);
    assert!(message.contains("permission denied"), "{message}");
    assert!(
        wait_until(Duration::from_secs(2), || log_lines(&pool).len()
            > log_before),
        "the daemon logged nothing"
    );
    std::thread::sleep(Duration::from_millis(200));
    let logged = log_lines(&pool)[log_before..].to_vec();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        logged[0].contains("refused") && logged[0].contains(&format!("uid {NOBODY}")),
        "{logged:?}"
    );
    // Nothing changed.
    assert_eq!(bytes_cached(&pool), cached);

    // Without the capability, the directory already keeps nobody out.
    let log_before = log_lines(&pool).len();
    let out = as_nobody(&pool, false, &["cache", "drop"]);
    let message = failed_cleanly("cache drop as nobody", &out);
    assert!(message.contains("permission denied"), "{message}");
    assert_eq!(log_lines(&pool).len(), log_before);
    assert_eq!(bytes_cached(&pool), cached);

    // Root still works.
    pool.ok(&["cache", "drop"]);
    assert_eq!(bytes_cached(&pool), 0);
    mount.unmount();
}

#[test]
fn a_socket_left_by_a_killed_daemon_is_replaced_by_the_next_mount() {
    if !can_mount("a_socket_left_by_a_killed_daemon_is_replaced_by_the_next_mount") {
        return;
    }
    let (pool, mut mount) = mounted(4);
    let mnt = mount.mountpoint.to_str().unwrap().to_string();
    let old_socket = socket_of(&pool);
    let pid = mount.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || !mount.daemon_alive()));
    mount.pid = None;

    // The socket is left behind, and nothing answers on it once the kernel has closed the dead
    // daemon's descriptors (a thread still leaving a FUSE request can hold them a moment after
    // the process looks gone).
    assert!(old_socket.exists());
    assert!(
        wait_until(Duration::from_secs(5), || {
            UnixStream::connect(&old_socket)
                .err()
                .is_some_and(|e| e.raw_os_error() == Some(libc::ECONNREFUSED))
        }),
        "the dead daemon's socket still accepts connections"
    );
    // Commands carry on: status lists no mount, cache drop finds none, changes still work.
    assert_eq!(
        pool.json(&["status"])["mounts"].as_array().unwrap().len(),
        0
    );
    assert!(pool.ok(&["cache", "drop"]).contains("no running mount"));
    pool.ok(&["config", "set", "copies", "1"]);

    pool.ok(&["umount", &mnt]);
    let mount = pool.mount_with(&["--no-bind"]);
    let new_socket = socket_of(&pool);
    assert_ne!(new_socket, old_socket);
    assert!(new_socket.exists());
    assert!(!old_socket.exists(), "the stale socket was not removed");
    read_direct(&mount.image("golden"), MIB);
    assert!(settled_bytes_cached(&pool) > 0);
    pool.ok(&["cache", "drop"]);
    assert_eq!(bytes_cached(&pool), 0);
    mount.unmount();
}

/// Reads a response's status line, waiting at most `timeout`.
fn status_line(stream: &mut UnixStream, timeout: Duration) -> String {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn slow_and_malformed_clients_do_not_block_others() {
    if !can_mount("slow_and_malformed_clients_do_not_block_others") {
        return;
    }
    let (pool, mount) = mounted(5);
    let socket = socket_of(&pool);

    // Clients that hold their connections: half a request, and garbage.
    let mut slow: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut stream = UnixStream::connect(&socket).unwrap();
            stream
                .write_all(b"GET /v1/stats HTTP/1.1\r\nHost: imgpool\r\n")
                .unwrap();
            stream
        })
        .collect();
    let mut garbage = UnixStream::connect(&socket).unwrap();
    garbage
        .write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .unwrap();
    let held_since = Instant::now();

    // Others are answered promptly meanwhile.
    read_direct(&mount.image("golden"), MIB);
    let started = Instant::now();
    assert!(bytes_cached(&pool) > 0);
    pool.ok(&["cache", "drop"]);
    assert_eq!(bytes_cached(&pool), 0);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "status and cache drop took {:?} while other clients held connections",
        started.elapsed()
    );
    assert!(
        held_since.elapsed() < Duration::from_secs(5),
        "too slow to prove anything"
    );

    // The malformed request got a 400; the slow ones are cut off after the daemon's deadline.
    let line = status_line(&mut garbage, Duration::from_secs(2));
    assert!(line.starts_with("HTTP/1.1 400"), "{line:?}");
    for stream in &mut slow {
        let line = status_line(stream, Duration::from_secs(10));
        assert!(line.starts_with("HTTP/1.1 408"), "{line:?}");
    }
    let log = log_lines(&pool).join("\n");
    assert!(log.contains("bad request"), "{log}");
    assert!(log.contains("no complete request"), "{log}");

    // A peer that closes without a word, or leaves before its answer, harms nothing.
    drop(UnixStream::connect(&socket).unwrap());
    let mut leaving = UnixStream::connect(&socket).unwrap();
    leaving
        .write_all(b"GET /v1/stats HTTP/1.1\r\nHost: imgpool\r\n\r\n")
        .unwrap();
    drop(leaving);
    assert!(mount_status(&pool)["stats"].is_object());
    mount.unmount();
}
