//! Test harness shared by the integration tests: a pool in a temporary directory driven through
//! the real `imgpool` binary, mounts and loop devices behind guards that clean up on drop (also
//! when a test fails), and the checks that decide whether a test needing root and FUSE runs.
#![allow(dead_code)] // each test binary uses its own subset

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "imgpool {args:?} should fail with exit code 1; stderr: {stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "imgpool {args:?} panicked: {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "imgpool {args:?}: expected one line, got: {stderr}"
        );
        assert!(lines[0].starts_with("imgpool: "), "{stderr}");
        lines[0].to_string()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
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
        let mountpoint = self.path("mnt");
        fs::create_dir_all(&mountpoint).unwrap();
        let mut guard = MountGuard {
            state: self.state.clone(),
            mountpoint: mountpoint.clone(),
            disks: self.disks.clone(),
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
        self.pid
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
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
        let mut targets: Vec<PathBuf> = self
            .disks
            .iter()
            .map(|d| d.join("backing-images"))
            .collect();
        targets.push(self.mountpoint.clone());
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

pub fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let path = path.to_str().unwrap();
    table
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path))
}

pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let mountpoint = dir.join(name);
        let disk = LoopDisk {
            image,
            device,
            mountpoint,
        };
        let mkfs = Command::new(format!("mkfs.{fs_type}"))
            .args(if fs_type == "ext4" {
                &["-q", "-F"][..]
            } else {
                &["-q", "-f"][..]
            })
            .arg(&disk.device)
            .output()
            .unwrap();
        assert!(
            mkfs.status.success(),
            "mkfs.{fs_type}: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        fs::create_dir_all(&disk.mountpoint).unwrap();
        let status = Command::new("mount")
            .arg(&disk.device)
            .arg(&disk.mountpoint)
            .status()
            .unwrap();
        assert!(status.success(), "mount {} failed", disk.device);
        disk
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
