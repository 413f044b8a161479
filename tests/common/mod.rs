//! Test harness shared by the integration tests: a pool in a temporary directory driven through
//! the real `imgpool` binary, mounts and loop devices behind guards that clean up on drop (also
//! when a test fails), and the checks that decide whether a test needing root and FUSE runs.
#![allow(dead_code)] // each test binary uses its own subset

pub mod sshd;
pub mod stream;

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_imgpool");

/// Whether tests that need root and /dev/fuse can run. In CI (`CI=true`) their absence is a
/// failure; elsewhere the test is skipped with the reason printed.
pub fn can_mount(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("it needs root")
    } else if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        Some("/dev/fuse cannot be opened")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: {reason}, and CI must run it")
        }
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            false
        }
    }
}

/// A pool with `n` disk directories, all in one temporary directory.
pub struct TestPool {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub disks: Vec<PathBuf>,
}

impl TestPool {
    /// An initialised pool without disks.
    pub fn empty() -> TestPool {
        let dir = tempfile::Builder::new()
            .prefix("imgpool-test.")
            .tempdir()
            .unwrap();
        let state = dir.path().join("state");
        let pool = TestPool {
            dir,
            state,
            disks: Vec::new(),
        };
        pool.ok(&["init"]);
        pool
    }

    /// An initialised pool with disks `d1`..`dn`, plain directories.
    pub fn new(n: usize) -> TestPool {
        let mut pool = TestPool::empty();
        for i in 1..=n {
            let path = pool.dir.path().join(format!("d{i}"));
            fs::create_dir(&path).unwrap();
            pool.add_disk(&format!("d{i}"), &path);
        }
        pool
    }

    pub fn add_disk(&mut self, name: &str, path: &Path) {
        self.ok(&["disk", "add", name, path.to_str().unwrap()]);
        self.disks.push(path.to_path_buf());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .env("IMGPOOL_STATE_DIR", &self.state)
            .env_remove("IMGPOOL_LOG")
            .args(args);
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "imgpool {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail cleanly: exit code 1, one line on stderr, no panic.
    /// Returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        failed_cleanly(&format!("imgpool {args:?}"), &self.run(args))
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// The names `volume list` shows, in its order.
    pub fn volume_names(&self) -> Vec<String> {
        self.names_listed(&["volume", "list"])
    }

    /// The names `image list` shows, in its order (by name).
    pub fn image_names(&self) -> Vec<String> {
        self.names_listed(&["image", "list"])
    }

    /// The names `snapshot list VOLUME` shows, in its order (creation).
    pub fn snapshot_names(&self, volume: &str) -> Vec<String> {
        self.names_listed(&["snapshot", "list", volume])
    }

    fn names_listed(&self, list: &[&str]) -> Vec<String> {
        self.json(list)
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Imports `file` as `name`; returns the uuid.
    pub fn add_image(&self, name: &str, file: &Path, copies: u32) -> String {
        let out = self.json(&[
            "image",
            "add",
            name,
            file.to_str().unwrap(),
            "--copies",
            &copies.to_string(),
        ]);
        out["uuid"].as_str().unwrap().to_string()
    }

    /// Mounts the pool (detached daemon) at `<dir>/mnt`, with the bind mounts.
    pub fn mount(&self) -> MountGuard {
        self.mount_with(&[])
    }

    pub fn mount_with(&self, extra: &[&str]) -> MountGuard {
        self.mount_at("mnt", extra)
    }

    /// Mounts the pool at `<dir>/<dir_name>`; with `--no-bind`, the guard owns no bind mount
    /// (another mount of the pool may own them).
    pub fn mount_at(&self, dir_name: &str, extra: &[&str]) -> MountGuard {
        let mountpoint = self.path(dir_name);
        fs::create_dir_all(&mountpoint).unwrap();
        let binds = !extra.contains(&"--no-bind");
        let mut guard = MountGuard {
            state: self.state.clone(),
            mountpoint: mountpoint.clone(),
            disks: if binds {
                self.disks.clone()
            } else {
                Vec::new()
            },
            pid: None,
        };
        let mut args = vec!["mount", mountpoint.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.ok(&args);
        let status = self.json(&["status"]);
        guard.pid = status["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountpoint"].as_str() == mountpoint.to_str())
            .map(|m| m["pid"].as_u64().unwrap() as i32);
        assert!(
            guard.pid.is_some(),
            "status lists no daemon for {mountpoint:?}: {status}"
        );
        guard
    }
}

/// A mount made by a test. Dropping it unmounts the bind mounts and the mount, by path, and
/// ends the daemon the test started if it is still running.
pub struct MountGuard {
    pub state: PathBuf,
    pub mountpoint: PathBuf,
    pub disks: Vec<PathBuf>,
    pub pid: Option<i32>,
}

impl MountGuard {
    pub fn image(&self, name: &str) -> PathBuf {
        self.mountpoint.join("images").join(name)
    }

    /// `disks/<disk>/<name>-<uuid>/backing` in the mount.
    pub fn disk_view(&self, disk: &str, name: &str, uuid: &str) -> PathBuf {
        self.mountpoint
            .join("disks")
            .join(disk)
            .join(format!("{name}-{uuid}"))
            .join("backing")
    }

    /// `<disk path>/backing-images/<name>-<uuid>/backing`: the path a replica opens.
    pub fn bound_view(&self, disk_path: &Path, name: &str, uuid: &str) -> PathBuf {
        disk_path
            .join("backing-images")
            .join(format!("{name}-{uuid}"))
            .join("backing")
    }

    pub fn daemon_alive(&self) -> bool {
        self.pid.is_some_and(process_alive)
    }

    /// The bind mount of every disk the guard knows, then the mount itself.
    pub fn targets(&self) -> Vec<PathBuf> {
        let mut targets: Vec<PathBuf> = self
            .disks
            .iter()
            .map(|d| d.join("backing-images"))
            .collect();
        targets.push(self.mountpoint.clone());
        targets
    }

    /// Unmounts with `imgpool umount`, asserting that it works; the guard then has nothing left.
    pub fn unmount(mut self) {
        let out = Command::new(BIN)
            .env("IMGPOOL_STATE_DIR", &self.state)
            .args(["umount", self.mountpoint.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mount_point(&self.mountpoint));
        for disk in &self.disks {
            assert!(!is_mount_point(&disk.join("backing-images")));
        }
        assert!(wait_until(Duration::from_secs(10), || !self.daemon_alive()));
        self.pid = None;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let targets = self.targets();
        if targets.iter().any(|t| is_mount_point(t)) {
            let _ = Command::new(BIN)
                .env("IMGPOOL_STATE_DIR", &self.state)
                .args(["umount", "--lazy", self.mountpoint.to_str().unwrap()])
                .output();
        }
        for target in &targets {
            if is_mount_point(target) {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
        if let Some(pid) = self.pid {
            if !wait_until(Duration::from_secs(5), || !self.daemon_alive()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Checks that a command failed cleanly: exit code 1, one line on stderr starting with
/// `imgpool: `, no panic. Returns that line. `what` names the command in messages.
pub fn failed_cleanly(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} should fail with exit code 1; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line, got: {stderr}");
    assert!(lines[0].starts_with("imgpool: "), "{stderr}");
    lines[0].to_string()
}

/// Whether process `pid` is running: it exists and is not a zombie waiting to be reaped.
/// Whether any thread of process `pid` still runs. A killed process's first thread turns
/// zombie while the others may still be exiting, holding its files (and so its locks and
/// sockets): it is alive until they all are gone.
pub fn process_alive(pid: i32) -> bool {
    let running = |stat: &str| {
        // `pid (comm) state ...`: comm may hold spaces and parentheses, the state follows the
        // last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    };
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|task| fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| running(&stat)))
}

/// A child process that is killed (SIGKILL) and reaped on drop unless the test took it back
/// with `take`.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// `imgpool ARGS` on `pool`, its output dropped.
    pub fn quiet(pool: &TestPool, args: &[&str]) -> ChildGuard {
        ChildGuard(Some(
            pool.command(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ))
    }

    pub fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    /// `kill -9`, then waits up to 10 s for it to end; returns its status if it ended (it may
    /// have ended by itself first).
    pub fn kill_9(&mut self) -> Option<ExitStatus> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        self.wait_timeout(Duration::from_secs(10))
    }

    /// Waits up to `timeout` for the child to exit; returns its status, or `None` if it still
    /// runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.0.as_mut().unwrap();
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        if status.is_some() {
            self.0 = None;
        }
        status
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `pread(2)`: up to `len` bytes at `offset`, as many as that single call returned.
pub fn pread(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = file.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// `getxattr(2)` of `name` on `path`, with a buffer of `size` bytes.
pub fn getxattr_sized(path: &Path, name: &str, size: usize) -> io::Result<Vec<u8>> {
    let (path, name) = (c_path(path), CString::new(name).unwrap());
    let mut buf = vec![0u8; size];
    // SAFETY: valid NUL-terminated strings and a buffer of `size` bytes.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `getxattr(2)`: asks for the size first, then reads the value.
pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (cpath, cname) = (c_path(path), CString::new(name).unwrap());
    // SAFETY: valid NUL-terminated strings; a null buffer of size 0 asks for the length.
    let n = unsafe { libc::getxattr(cpath.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    getxattr_sized(path, name, n as usize)
}

/// `listxattr(2)`: the names of the extended attributes of `path`.
pub fn listxattr(path: &Path) -> io::Result<Vec<String>> {
    let cpath = c_path(path);
    // SAFETY: a valid NUL-terminated path; a null buffer of size 0 asks for the length.
    let n = unsafe { libc::listxattr(cpath.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: as above, with a buffer of `buf.len()` bytes.
    let n = unsafe { libc::listxattr(cpath.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect())
}

/// `setxattr(2)` of `name` to `value` on `path`.
pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (cpath, cname) = (c_path(path), CString::new(name).unwrap());
    // SAFETY: valid NUL-terminated strings and a value of `value.len()` bytes.
    let rc = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `removexattr(2)` of `name` on `path`.
pub fn removexattr(path: &Path, name: &str) -> io::Result<()> {
    let (cpath, cname) = (c_path(path), CString::new(name).unwrap());
    // SAFETY: valid NUL-terminated strings.
    if unsafe { libc::removexattr(cpath.as_ptr(), cname.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let path = path.to_str().unwrap();
    table
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path))
}

pub fn wait_until(timeout: Duration, condition: impl FnMut() -> bool) -> bool {
    poll(timeout, Duration::from_millis(20), condition)
}

/// Checks `condition` every `every` until it holds (true) or `timeout` passes (false).
pub fn poll(timeout: Duration, every: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Linux 6.9 brought FUSE passthrough.
pub fn kernel_has_passthrough() -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 9)
}

/// Writes `size` bytes of pseudo-random data (a fixed seed per call site is enough: the
/// content only has to differ from zeros and from other images).
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut file = File::create(path).unwrap();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        file.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    file.sync_all().unwrap();
}

/// SHA-512 of a file as `sha512sum` computes it: a real client, reading through the kernel.
pub fn sha512sum(path: &Path) -> String {
    let out = Command::new("sha512sum").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "sha512sum {path:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()[..128].to_string()
}

/// A small tmpfs mounted at `path` (created if missing): a mount point that is not imgpool's.
/// Dropping it unmounts it.
pub struct TmpfsMount {
    pub path: PathBuf,
}

impl TmpfsMount {
    pub fn new(path: &Path) -> TmpfsMount {
        fs::create_dir_all(path).unwrap();
        let mount = TmpfsMount {
            path: path.to_path_buf(),
        };
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "imgpool-test"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs at {path:?} failed");
        mount
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if is_mount_point(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Makes a `fs_type` filesystem on `device` (with `options` for mkfs) and mounts it at
/// `mountpoint`, which is created.
fn make_fs_and_mount(device: &str, mountpoint: &Path, fs_type: &str, options: &[&str]) {
    let mkfs = Command::new(format!("mkfs.{fs_type}"))
        .args(options)
        .arg(device)
        .output()
        .unwrap();
    assert!(
        mkfs.status.success(),
        "mkfs.{fs_type} {device}: {}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    fs::create_dir_all(mountpoint).unwrap();
    let status = Command::new("mount")
        .arg(device)
        .arg(mountpoint)
        .status()
        .unwrap();
    assert!(status.success(), "mount {device} failed");
}

/// A filesystem on a loop device, mounted under `dir`. Dropping it unmounts and detaches.
pub struct LoopDisk {
    pub image: PathBuf,
    pub device: String,
    pub mountpoint: PathBuf,
}

impl LoopDisk {
    /// A fresh `fs_type` ("ext4", "xfs") filesystem of `size` bytes.
    pub fn new(dir: &Path, name: &str, size: u64, fs_type: &str) -> LoopDisk {
        let image = dir.join(format!("{name}.fs"));
        File::create(&image).unwrap().set_len(size).unwrap();
        let device = attach_loop(&image);
        let mountpoint = dir.join(name);
        let disk = LoopDisk {
            image,
            device,
            mountpoint,
        };
        let options: &[&str] = if fs_type == "ext4" {
            &["-q", "-F"]
        } else {
            &["-q", "-f"]
        };
        make_fs_and_mount(&disk.device, &disk.mountpoint, fs_type, options);
        disk
    }
}

/// Attaches a free loop device to `file`; returns its path. The caller detaches it.
pub fn attach_loop(file: &Path) -> String {
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup {file:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs a command that must succeed, with its output in the failure message.
pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop device over a file, detached on drop.
pub struct LoopFile {
    pub device: PathBuf,
}

impl LoopFile {
    pub fn attach(file: &Path) -> LoopFile {
        LoopFile {
            device: attach_loop(file).into(),
        }
    }

    /// A read-only loop device (`losetup -r`): the kernel opens the file read-only.
    pub fn attach_read_only(file: &Path) -> LoopFile {
        let out = Command::new("losetup")
            .args(["--read-only", "--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup -r {file:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopFile {
            device: String::from_utf8(out.stdout).unwrap().trim().into(),
        }
    }
}

impl Drop for LoopFile {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A filesystem mounted by the test, unmounted on drop.
pub struct Mounted {
    pub target: PathBuf,
}

impl Mounted {
    pub fn new(device: &Path, target: &Path) -> Mounted {
        fs::create_dir_all(target).unwrap();
        run_ok(Command::new("mount").arg(device).arg(target));
        Mounted {
            target: target.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A filesystem can stay busy a moment after its last user (a loop device being
        // released, writeback): retried, then detached lazily rather than left mounted.
        let unmounted = poll(Duration::from_secs(5), Duration::from_millis(100), || {
            !is_mount_point(&self.target)
                || Command::new("umount")
                    .arg(&self.target)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let bind = self.mountpoint.join("backing-images");
        if is_mount_point(&bind) {
            let _ = Command::new("umount").arg("-l").arg(&bind).status();
        }
        if is_mount_point(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// An ext4 filesystem on a block device whose sectors can be made to fail reads, as a disk with
/// bad sectors does: a loop device over a file that a small FUSE filesystem in this process
/// serves from a sparse file, answering `EIO` to every read that touches a range it was told to
/// fail (dm-error's job, done without device-mapper, which not every test kernel has). Writes
/// always succeed. Dropping it unmounts the filesystem, detaches the loop device and ends the
/// FUSE session, also when a test fails.
pub struct FaultyDisk {
    pub mountpoint: PathBuf,
    pub device: String,
    /// The FUSE mount: a regular file, the loop device's backing file.
    node: PathBuf,
    bad: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    failed_reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
    session: Option<fuser::BackgroundSession>,
    loop_attached: bool,
}

/// The FUSE side of a `FaultyDisk`: one regular file, the root inode.
struct BadSectors {
    backing: File,
    size: u64,
    bad: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    failed_reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BadSectors {
    fn attr(&self) -> fuser::FileAttr {
        let now = std::time::SystemTime::now();
        fuser::FileAttr {
            ino: fuser::INodeNo(1),
            size: self.size,
            blocks: self.size / 512,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: fuser::FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl fuser::Filesystem for BadSectors {
    fn getattr(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        reply.attr(&Duration::from_secs(1), &self.attr());
    }

    fn open(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        // Direct I/O: no page cache of this file stands between the loop device and the faults.
        reply.opened(fuser::FileHandle(0), fuser::FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        let end = offset + size as u64;
        let bad = self
            .bad
            .lock()
            .unwrap()
            .iter()
            .any(|&(start, stop)| offset < stop && start < end);
        if bad {
            self.failed_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return reply.error(fuser::Errno::EIO);
        }
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match self.backing.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) => return reply.error(fuser::Errno::EIO),
            }
        }
        reply.data(&buf[..done]);
    }

    fn write(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        match self.backing.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(fuser::Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }
}

impl FaultyDisk {
    /// A fresh ext4 filesystem of `size` bytes, mounted at `dir/name`.
    pub fn new(dir: &Path, name: &str, size: u64) -> FaultyDisk {
        let backing_path = dir.join(format!("{name}.sectors"));
        let backing = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&backing_path)
            .unwrap();
        backing.set_len(size).unwrap();
        let node = dir.join(format!("{name}.dev"));
        File::create(&node).unwrap();
        let bad = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let failed_reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sectors = BadSectors {
            backing,
            size,
            bad: bad.clone(),
            failed_reads: failed_reads.clone(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("imgpool-test-sectors".into())];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(sectors, &node, &config)
            .unwrap_or_else(|e| panic!("FUSE mount of {node:?}: {e}"));
        let mut disk = FaultyDisk {
            mountpoint: dir.join(name),
            device: String::new(),
            node,
            bad,
            failed_reads,
            session: Some(session),
            loop_attached: false,
        };
        disk.device = attach_loop(&disk.node);
        disk.loop_attached = true;
        make_fs_and_mount(
            &disk.device,
            &disk.mountpoint,
            "ext4",
            &["-q", "-F", "-E", "nodiscard"],
        );
        disk
    }

    /// Makes every read of the blocks under `file` (a file on this disk) fail with EIO, and
    /// drops the file's cached pages so that its next reads reach the device. Returns the
    /// byte ranges of the device that now fail.
    pub fn fail_reads_of(&self, file: &Path) -> Vec<(u64, u64)> {
        let ranges = physical_extents(file);
        assert!(!ranges.is_empty(), "{file:?} has no blocks on the device");
        self.bad.lock().unwrap().extend(&ranges);
        let opened = File::open(file).unwrap();
        nix::fcntl::posix_fadvise(
            &opened,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        ranges
    }

    /// How many reads the device has failed so far.
    pub fn failed_reads(&self) -> u64 {
        self.failed_reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The byte ranges `file` occupies on its block device, from `filefrag -e -v` (FIEMAP).
pub fn physical_extents(file: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("filefrag")
        .args(["-e", "-v"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "filefrag {file:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // "File size of F is N (M blocks of 4096 bytes)", then one line per extent:
    // "   0:        0..    4095:      34816..     38911:   4096:             last,eof".
    let block: u64 = text
        .split("blocks of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no block size in filefrag's output: {text}"));
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').map(str::trim).collect();
            if fields.len() < 4 || fields[0].parse::<u64>().is_err() {
                return None;
            }
            let (start, end) = fields[2].split_once("..")?;
            let start: u64 = start.trim().parse().ok()?;
            let end: u64 = end.trim().parse().ok()?;
            Some((start * block, (end + 1) * block))
        })
        .collect()
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        let bind = self.mountpoint.join("backing-images");
        if is_mount_point(&bind) {
            let _ = Command::new("umount").arg("-l").arg(&bind).status();
        }
        if is_mount_point(&self.mountpoint) {
            let unmounted = Command::new("umount")
                .arg(&self.mountpoint)
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        if self.loop_attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
        // Unmounts the FUSE file; its thread ends with the session.
        drop(self.session.take());
        if is_mount_point(&self.node) {
            let _ = Command::new("umount").arg("-l").arg(&self.node).status();
        }
    }
}

/// A small xorshift generator: random test choices that a seed replays (not zero).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Waits until no process has `volume` open (a mount daemon hears of a last close a moment
/// after `close` returns).
pub fn wait_closed(pool: &TestPool, volume: &str) {
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(20), || pool
            .json(&["volume", "show", volume])["open_by_pid"]
            .is_null()),
        "volume {volume} stays open"
    );
}

/// Reads a file of a mount once it shows (a new snapshot or volume appears at the mount's next
/// look at the index).
pub fn read_mounted(path: &Path) -> Vec<u8> {
    assert!(
        poll(Duration::from_secs(5), Duration::from_millis(20), || path
            .exists()),
        "{} does not appear",
        path.display()
    );
    fs::read(path).unwrap()
}

/// A volume's snapshots as (name, guid), oldest first (`snapshot list --json`).
pub fn snapshot_list(pool: &TestPool, volume: &str) -> Vec<(String, String)> {
    pool.json(&["snapshot", "list", volume])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["guid"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
