//! The FUSE views, tested through a real mount with real clients (sha512sum, dd, mmap, and the
//! system calls themselves), and the mount daemon's lifecycle.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::Pid;
use sha2::{Digest, Sha512};

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn every_view_serves_the_image_bytes_with_every_reader() {
    if !can_mount("every_view_serves_the_image_bytes_with_every_reader") {
        return;
    }
    let pool = TestPool::new(3);
    let source = pool.path("source.img");
    random_file(&source, 64 * MIB, 1);
    let uuid = pool.add_image("golden", &source, 1);
    let expected = sha512sum(&source);
    let mount = pool.mount();

    let mut paths = vec![mount.image("golden")];
    for (i, disk) in pool.disks.iter().enumerate() {
        paths.push(mount.disk_view(&format!("d{}", i + 1), "golden", &uuid));
        paths.push(mount.bound_view(disk, "golden", &uuid));
    }
    for path in &paths {
        assert_eq!(sha512sum(path), expected, "sha512sum of {path:?}");
        let direct = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dd if='{}' iflag=direct bs=4k status=none | sha512sum",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(direct.status.success());
        assert_eq!(
            &String::from_utf8_lossy(&direct.stdout)[..128],
            expected,
            "O_DIRECT read of {path:?}"
        );
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: the file is a read-only image that nothing modifies while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert!(
            map[..] == std::fs::read(&source).unwrap()[..],
            "mmap of {path:?}"
        );
    }

    let inodes: Vec<u64> = paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect();
    assert!(
        inodes.iter().all(|i| *i == inodes[0]),
        "one image, several inodes: {inodes:?}"
    );
    mount.unmount();
}

/// Asserts that `result` is the error EROFS; `what` names the operation in the message.
fn expect_erofs<T: std::fmt::Debug>(what: &str, result: io::Result<T>) {
    match result {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "{what}: expected EROFS, got {e}"
        ),
        Ok(value) => panic!("{what}: expected EROFS, but it succeeded ({value:?})"),
    }
}

/// Asserts that `path` does not exist (stat says ENOENT).
fn expect_enoent(path: &Path) {
    match fs::metadata(path) {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOENT),
            "stat {path:?}: expected ENOENT, got {e}"
        ),
        Ok(_) => panic!("{path:?} exists"),
    }
}

fn is_enoent(path: &Path) -> bool {
    matches!(fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOENT))
}

fn nix_io<T>(result: nix::Result<T>) -> io::Result<T> {
    result.map_err(io::Error::from)
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn open_handles(pool: &TestPool, image: &str) -> u64 {
    pool.json(&["image", "show", image])["open_handles"]
        .as_u64()
        .unwrap()
}

/// The names `gc` reported, sorted.
fn gc(pool: &TestPool, args: &[&str]) -> Vec<String> {
    let mut all = vec!["gc"];
    all.extend_from_slice(args);
    let out = pool.json(&all);
    assert_eq!(
        out["dry_run"].as_bool(),
        Some(args.contains(&"--dry-run")),
        "{out}"
    );
    let mut removed: Vec<String> = out["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    removed.sort();
    removed
}

/// Every operation that would change `file` (an image in some view) fails with EROFS, and so
/// does every operation that would add to, remove or change `dirs` (directories of that view;
/// `removable` ones are also tried with rmdir and rename).
fn assert_read_only(view: &str, file: &Path, dirs: &[&Path], removable: &[&Path]) {
    let open = |what: &str, options: &mut OpenOptions| {
        expect_erofs(&format!("{view}: {what} {file:?}"), options.open(file));
    };
    open("open O_WRONLY", OpenOptions::new().write(true));
    open("open O_RDWR", OpenOptions::new().read(true).write(true));
    open(
        "open O_RDONLY|O_TRUNC",
        OpenOptions::new().read(true).custom_flags(libc::O_TRUNC),
    );
    open("open O_APPEND", OpenOptions::new().append(true));
    let what = |op: &str| format!("{view}: {op} {file:?}");
    expect_erofs(
        &what("access(W_OK)"),
        nix_io(nix::unistd::access(file, nix::unistd::AccessFlags::W_OK)),
    );
    expect_erofs(&what("unlink"), fs::remove_file(file));
    let sibling = file.with_file_name("renamed");
    expect_erofs(&what("rename"), fs::rename(file, &sibling));
    expect_erofs(
        &what("link"),
        fs::hard_link(file, file.with_file_name("hardlink")),
    );
    expect_erofs(
        &what("chmod"),
        fs::set_permissions(file, fs::Permissions::from_mode(0o644)),
    );
    expect_erofs(
        &what("chown"),
        nix_io(nix::unistd::chown(
            file,
            Some(nix::unistd::Uid::from_raw(65534)),
            Some(nix::unistd::Gid::from_raw(65534)),
        )),
    );
    expect_erofs(&what("truncate"), nix_io(nix::unistd::truncate(file, 0)));
    expect_erofs(
        &what("utimensat"),
        nix_io(nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            file,
            &TimeSpec::UTIME_NOW,
            &TimeSpec::UTIME_NOW,
            UtimensatFlags::FollowSymlink,
        )),
    );
    expect_erofs(
        &what("setxattr of a new name"),
        setxattr(file, "user.test", b"x"),
    );
    expect_erofs(
        &what("setxattr of user.imgpool.sha512"),
        setxattr(file, "user.imgpool.sha512", b"0"),
    );
    expect_erofs(
        &what("removexattr"),
        removexattr(file, "user.imgpool.sha512"),
    );

    for dir in dirs {
        let what = |op: &str| format!("{view}: {op} in {dir:?}");
        expect_erofs(
            &what("create"),
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join("new-file")),
        );
        expect_erofs(
            &what("open O_CREAT|O_RDONLY"),
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CREAT)
                .open(dir.join("new-file")),
        );
        expect_erofs(
            &what("mknod"),
            nix_io(nix::sys::stat::mknod(
                &dir.join("new-node"),
                SFlag::S_IFREG,
                Mode::from_bits_truncate(0o644),
                0,
            )),
        );
        expect_erofs(
            &what("mkfifo"),
            nix_io(nix::unistd::mkfifo(
                &dir.join("new-fifo"),
                Mode::from_bits_truncate(0o644),
            )),
        );
        expect_erofs(&what("mkdir"), fs::create_dir(dir.join("new-dir")));
        expect_erofs(
            &what("symlink"),
            std::os::unix::fs::symlink("target", dir.join("new-symlink")),
        );
        expect_erofs(
            &what("chmod"),
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)),
        );
        expect_erofs(&what("setxattr"), setxattr(dir, "user.test", b"x"));
        for name in ["new-file", "new-node", "new-fifo", "new-dir", "new-symlink"] {
            expect_enoent(&dir.join(name));
        }
    }
    for dir in removable {
        let what = |op: &str| format!("{view}: {op} {dir:?}");
        expect_erofs(&what("rmdir"), fs::remove_dir(dir));
        expect_erofs(
            &what("rename"),
            fs::rename(dir, dir.with_file_name("renamed-dir")),
        );
        assert!(dir.is_dir(), "{view}: {dir:?} is gone");
    }
    assert!(file.is_file(), "{view}: {file:?} is gone");
    expect_enoent(&sibling);
}

#[test]
fn writes_fail_with_erofs() {
    if !can_mount("writes_fail_with_erofs") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, MIB, 10);
    let uuid = pool.add_image("golden", &source, 1);
    let expected = sha512sum(&source);
    let mount = pool.mount();
    let images = mount.mountpoint.join("images");
    let disks = mount.mountpoint.join("disks");
    let d1 = disks.join("d1");
    let view_dir = d1.join(format!("golden-{uuid}"));
    let bound_root = pool.disks[0].join("backing-images");
    let bound_dir = bound_root.join(format!("golden-{uuid}"));

    assert_read_only(
        "images/",
        &mount.image("golden"),
        &[&images, &mount.mountpoint],
        &[&images, &disks],
    );
    assert_read_only(
        "disk view",
        &mount.disk_view("d1", "golden", &uuid),
        &[&d1, &view_dir],
        &[&d1, &view_dir],
    );
    assert_read_only(
        "disk view backing.cfg",
        &view_dir.join("backing.cfg"),
        &[],
        &[],
    );
    assert_read_only(
        "bound view",
        &mount.bound_view(&pool.disks[0], "golden", &uuid),
        &[&bound_root, &bound_dir],
        &[&bound_dir],
    );
    assert_read_only(
        "bound view backing.cfg",
        &bound_dir.join("backing.cfg"),
        &[],
        &[],
    );

    // Nothing changed: the image is whole and the views hold what they held.
    assert_eq!(sha512sum(&mount.image("golden")), expected);
    assert_eq!(names_in(&images), ["golden"]);
    assert_eq!(names_in(&bound_dir), ["backing", "backing.cfg"]);
    mount.unmount();
}

#[test]
fn reads_at_and_past_eof_behave_like_a_regular_file() {
    if !can_mount("reads_at_and_past_eof_behave_like_a_regular_file") {
        return;
    }
    const BLOCK: u64 = 4096;
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    let size = 5 * MIB + 123;
    random_file(&source, size, 20);
    let data = fs::read(&source).unwrap();
    let uuid = pool.add_image("odd", &source, 1);
    let mount = pool.mount();

    let paths = [
        mount.image("odd"),
        mount.disk_view("d2", "odd", &uuid),
        mount.bound_view(&pool.disks[0], "odd", &uuid),
    ];
    let at = |offset: u64| &data[offset as usize..];
    for path in &paths {
        let file = File::open(path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), size, "size of {path:?}");
        assert_eq!(
            pread(&file, size - 10, 100).unwrap(),
            at(size - 10),
            "pread of 100 bytes 10 before the end of {path:?}"
        );
        for offset in [size, size + 1, size + 10 * MIB] {
            assert!(
                pread(&file, offset, 100).unwrap().is_empty(),
                "pread at {offset} of {path:?} (size {size})"
            );
        }
        assert_eq!(fs::read(path).unwrap(), data, "read to the end of {path:?}");

        // O_DIRECT: aligned offsets, lengths and buffer (an anonymous map is page-aligned).
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap();
        let mut buf = memmap2::MmapMut::map_anon(4 * BLOCK as usize).unwrap();
        let last_block = size / BLOCK * BLOCK;
        let n = direct
            .read_at(&mut buf[..BLOCK as usize], last_block)
            .unwrap();
        assert_eq!(
            n as u64,
            size - last_block,
            "O_DIRECT read of the last partial block of {path:?}"
        );
        assert_eq!(&buf[..n], at(last_block));
        let n = direct
            .read_at(&mut buf[..3 * BLOCK as usize], last_block - 2 * BLOCK)
            .unwrap();
        assert_eq!(
            n as u64,
            2 * BLOCK + size - last_block,
            "O_DIRECT read across the end of {path:?}"
        );
        assert_eq!(&buf[..n], at(last_block - 2 * BLOCK));
        let n = direct.read_at(&mut buf[..BLOCK as usize], 0).unwrap();
        assert_eq!(&buf[..n], &data[..BLOCK as usize], "O_DIRECT read at 0");
        for offset in [last_block + BLOCK, last_block + 100 * BLOCK] {
            let n = direct.read_at(&mut buf[..BLOCK as usize], offset).unwrap();
            assert_eq!(n, 0, "O_DIRECT read at {offset} of {path:?} (size {size})");
        }
    }
    mount.unmount();
}

#[test]
fn xattrs_expose_sha512_uuid_and_name() {
    if !can_mount("xattrs_expose_sha512_uuid_and_name") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    let size = 3 * MIB + 7;
    random_file(&source, size, 30);
    let uuid = pool.add_image("golden", &source, 1);
    let info = pool.json(&["image", "show", "golden"]);
    let sha512 = info["sha512"].as_str().unwrap().to_string();
    assert_eq!(info["uuid"].as_str(), Some(uuid.as_str()));
    assert_eq!(sha512, sha512sum(&source));
    let mount = pool.mount();

    let mut paths = vec![mount.image("golden")];
    for (i, disk) in pool.disks.iter().enumerate() {
        let view = mount.disk_view(&format!("d{}", i + 1), "golden", &uuid);
        // The `<name>-<uuid>` directory carries them too.
        paths.push(view.parent().unwrap().to_path_buf());
        paths.push(view);
        paths.push(mount.bound_view(disk, "golden", &uuid));
    }
    for path in &paths {
        let get = |name: &str| String::from_utf8(getxattr(path, name).unwrap()).unwrap();
        assert_eq!(
            get("user.imgpool.sha512"),
            sha512,
            "sha512 xattr of {path:?}"
        );
        assert_eq!(get("user.imgpool.uuid"), uuid, "uuid xattr of {path:?}");
        assert_eq!(get("user.imgpool.name"), "golden", "name xattr of {path:?}");
        let names = listxattr(path).unwrap();
        for name in [
            "user.imgpool.sha512",
            "user.imgpool.uuid",
            "user.imgpool.name",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "listxattr of {path:?}: {names:?}"
            );
        }
        let err = getxattr(path, "user.imgpool.unknown").unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENODATA),
            "unknown xattr of {path:?}: {err}"
        );
        let err = getxattr_sized(path, "user.imgpool.sha512", 16).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ERANGE),
            "sha512 xattr into 16 bytes on {path:?}: {err}"
        );
    }
    // The directories above the images describe no image.
    for dir in [
        mount.mountpoint.join("images"),
        pool.disks[0].join("backing-images"),
    ] {
        assert_eq!(listxattr(&dir).unwrap(), Vec::<String>::new(), "{dir:?}");
        let err = getxattr(&dir, "user.imgpool.sha512").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODATA), "{dir:?}: {err}");
    }

    // backing.cfg: Longhorn's JSON, with this image's facts.
    let mut configs = Vec::new();
    for (i, disk) in pool.disks.iter().enumerate() {
        let dir = format!("golden-{uuid}");
        configs.push(
            mount
                .mountpoint
                .join("disks")
                .join(format!("d{}", i + 1))
                .join(&dir)
                .join("backing.cfg"),
        );
        configs.push(disk.join("backing-images").join(&dir).join("backing.cfg"));
    }
    let stored = info["stored_bytes"].as_u64().unwrap();
    for path in &configs {
        let bytes = fs::read(path).unwrap();
        assert_eq!(
            fs::metadata(path).unwrap().len(),
            bytes.len() as u64,
            "st_size of {path:?} is not the length of its content"
        );
        let config: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path:?} is not JSON ({e}): {bytes:?}"));
        for field in [
            "name",
            "uuid",
            "size",
            "virtualSize",
            "realSize",
            "expectedChecksum",
            "currentChecksum",
            "modificationTime",
        ] {
            assert!(
                config.get(field).is_some(),
                "{path:?} has no {field}: {config}"
            );
        }
        assert_eq!(config["name"], "golden", "{path:?}");
        assert_eq!(config["uuid"].as_str(), Some(uuid.as_str()), "{path:?}");
        assert_eq!(config["size"].as_u64(), Some(size), "{path:?}");
        assert_eq!(config["virtualSize"].as_u64(), Some(size), "{path:?}");
        assert_eq!(config["realSize"].as_u64(), Some(stored), "{path:?}");
        assert_eq!(
            config["expectedChecksum"].as_str(),
            Some(sha512.as_str()),
            "{path:?}"
        );
        assert_eq!(
            config["currentChecksum"].as_str(),
            Some(sha512.as_str()),
            "{path:?}"
        );
        let modified = config["modificationTime"].as_str().unwrap();
        assert!(
            humantime::parse_rfc3339(modified).is_ok(),
            "modificationTime {modified:?} of {path:?} is not RFC 3339"
        );
    }
    mount.unmount();
}

#[test]
fn holders_and_open_files_block_removal() {
    if !can_mount("holders_and_open_files_block_removal") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, 4 * MIB, 40);
    let expected = sha512sum(&source);
    let uuid = pool.add_image("img", &source, 2);
    let copies: Vec<PathBuf> = pool.json(&["image", "show", "img"])["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| PathBuf::from(c["path"].as_str().unwrap()))
        .collect();
    assert_eq!(copies.len(), 2);
    let mount = pool.mount();
    let bound = mount.bound_view(&pool.disks[0], "img", &uuid);

    pool.ok(&["ref", "add", "img", "r1"]);
    pool.ok(&["ref", "add", "img", "r2"]);
    let message = pool.fails(&["image", "rm", "img"]);
    assert!(
        message.contains("'img'") && message.contains("r1") && message.contains("r2"),
        "image rm of a held image: {message}"
    );
    assert_eq!(sha512sum(&mount.image("img")), expected);
    assert_eq!(sha512sum(&bound), expected);

    pool.ok(&["ref", "rm", "img", "r1"]);
    pool.ok(&["ref", "rm", "img", "r2"]);
    let file = File::open(&bound).unwrap();
    assert_eq!(open_handles(&pool, "img"), 1);
    let message = pool.fails(&["image", "rm", "img"]);
    assert!(
        message.contains("'img'") && message.contains("open file"),
        "image rm of an open image: {message}"
    );
    assert_eq!(
        pread(&file, 0, 4096).unwrap(),
        &fs::read(&source).unwrap()[..4096]
    );
    assert_eq!(sha512sum(&mount.image("img")), expected);

    drop(file);
    // The kernel sends RELEASE asynchronously after close.
    assert!(
        wait_until(Duration::from_secs(5), || open_handles(&pool, "img") == 0),
        "the close of the file is not seen: {}",
        pool.json(&["image", "show", "img"])
    );
    pool.ok(&["image", "rm", "img"]);

    let mut gone = vec![mount.image("img")];
    for (i, disk) in pool.disks.iter().enumerate() {
        let view = mount.disk_view(&format!("d{}", i + 1), "img", &uuid);
        gone.push(view.parent().unwrap().to_path_buf());
        gone.push(view);
        gone.push(mount.bound_view(disk, "img", &uuid));
    }
    assert!(
        wait_until(Duration::from_secs(1), || gone.iter().all(|p| is_enoent(p))),
        "still visible a second after image rm: {:?}",
        gone.iter().filter(|p| !is_enoent(p)).collect::<Vec<_>>()
    );
    for path in &gone {
        expect_enoent(path);
    }
    assert!(names_in(&mount.mountpoint.join("images")).is_empty());
    for disk in &pool.disks {
        assert!(names_in(&disk.join("backing-images")).is_empty());
    }
    for copy in &copies {
        expect_enoent(copy);
    }
    mount.unmount();
}

#[test]
fn gc_removes_only_unreferenced_images_past_grace() {
    if !can_mount("gc_removes_only_unreferenced_images_past_grace") {
        return;
    }
    let pool = TestPool::new(1);
    let mut copies = Vec::new();
    for (i, name) in ["held", "released", "never", "open"].iter().enumerate() {
        let source = pool.path(&format!("{name}.img"));
        random_file(&source, MIB, 50 + i as u64);
        if *name == "open" {
            continue; // imported later, once the first collection is done
        }
        pool.add_image(name, &source, 1);
        copies.push(PathBuf::from(
            pool.json(&["image", "show", name])["copies"][0]["path"]
                .as_str()
                .unwrap(),
        ));
    }
    pool.ok(&["ref", "add", "held", "h1"]);
    pool.ok(&["ref", "add", "released", "r1"]);
    pool.ok(&["ref", "rm", "released", "r1"]);
    let all = ["held", "never", "released"];

    assert_eq!(gc(&pool, &["--grace", "1h"]), Vec::<String>::new());
    assert_eq!(pool.image_names(), all);

    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        gc(&pool, &["--dry-run", "--grace", "0s"]),
        ["never", "released"]
    );
    assert_eq!(pool.image_names(), all, "gc --dry-run removed images");
    assert!(copies.iter().all(|c| c.exists()));

    assert_eq!(gc(&pool, &["--grace", "1s"]), ["never", "released"]);
    assert_eq!(pool.image_names(), ["held"]);
    assert!(copies[0].exists(), "the held image's copy is gone");
    expect_enoent(&copies[1]);
    expect_enoent(&copies[2]);

    // An open file keeps an image that no holder has.
    pool.add_image("open", &pool.path("open.img"), 1);
    let mount = pool.mount();
    let file = File::open(mount.image("open")).unwrap();
    assert_eq!(gc(&pool, &["--grace", "0s"]), Vec::<String>::new());
    assert_eq!(pool.image_names(), ["held", "open"]);
    assert_eq!(pread(&file, 0, 10).unwrap().len(), 10);
    drop(file);
    assert!(
        wait_until(Duration::from_secs(5), || open_handles(&pool, "open") == 0),
        "the close of the file is not seen"
    );
    assert_eq!(gc(&pool, &["--grace", "0s"]), ["open"]);
    assert_eq!(pool.image_names(), ["held"]);
    assert!(
        wait_until(Duration::from_secs(1), || is_enoent(&mount.image("open"))),
        "images/open is still there a second after gc"
    );
    mount.unmount();
}

#[test]
fn sparse_image_stays_sparse_and_reads_zeros_in_holes() {
    if !can_mount("sparse_image_stays_sparse_and_reads_zeros_in_holes") {
        return;
    }
    const GIB: u64 = 1 << 30;
    const CHUNK: u64 = 2 * MIB;
    let pool = TestPool::new(1);
    let source = pool.path("sparse.img");
    let size = 4 * GIB;
    let offsets = [0, GIB + 12 * 1024, 2 * GIB + 5 * MIB + 512, size - CHUNK];
    let mut chunks = Vec::new();
    {
        let file = File::create(&source).unwrap();
        file.set_len(size).unwrap();
        for (i, offset) in offsets.iter().enumerate() {
            let chunk_path = pool.path("chunk");
            random_file(&chunk_path, CHUNK, 60 + i as u64);
            let chunk = fs::read(&chunk_path).unwrap();
            file.write_all_at(&chunk, *offset).unwrap();
            chunks.push(chunk);
        }
        file.sync_all().unwrap();
    }
    // The expected digest is computed from the layout written above, while the import runs:
    // `sha512sum` of the 4 GiB source reads every hole through the kernel and took ~19 s on a
    // 2-core machine, over this test's budget; hashing the layout in memory takes ~14 s, and
    // overlaps with the import's own hashing.
    let started = Instant::now();
    let (expected, uuid) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| {
            let mut hasher = Sha512::new();
            let zeros = vec![0u8; 8 << 20];
            let mut at = 0;
            for (offset, chunk) in offsets.iter().zip(&chunks) {
                while at < *offset {
                    let n = (*offset - at).min(zeros.len() as u64);
                    hasher.update(&zeros[..n as usize]);
                    at += n;
                }
                hasher.update(chunk);
                at += chunk.len() as u64;
            }
            assert_eq!(at, size, "the last chunk ends the file");
            hex::encode(hasher.finalize())
        });
        let uuid = pool.add_image("sparse", &source, 1);
        (hashing.join().unwrap(), uuid)
    });
    eprintln!(
        "import and SHA-512 of the 4 GiB sparse source: {:?}",
        started.elapsed()
    );
    let info = pool.json(&["image", "show", "sparse"]);
    assert_eq!(info["sha512"].as_str(), Some(expected.as_str()));
    assert_eq!(info["size"].as_u64(), Some(size));

    let limit = 16 * MIB;
    let copy = pool.disks[0]
        .join(".imgpool/copies")
        .join(format!("{uuid}.img"));
    assert_eq!(info["copies"][0]["path"].as_str(), copy.to_str());
    let meta = fs::metadata(&copy).unwrap();
    assert_eq!(meta.len(), size);
    let allocated = meta.blocks() * 512;
    assert!(
        (4 * CHUNK..limit).contains(&allocated),
        "the copy allocates {allocated} bytes for {} bytes of data",
        4 * CHUNK
    );
    let stored = info["stored_bytes"].as_u64().unwrap();
    assert!(stored < limit, "stored_bytes {stored}");

    let mount = pool.mount();
    let paths = [
        mount.image("sparse"),
        mount.bound_view(&pool.disks[0], "sparse", &uuid),
    ];
    for path in &paths {
        let file = File::open(path).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), size, "{path:?}");
        assert!(
            meta.blocks() * 512 < limit,
            "{path:?} reports {} allocated bytes",
            meta.blocks() * 512
        );
        let read = |offset: u64, len: u64| {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset).unwrap();
            buf
        };
        for (offset, chunk) in offsets.iter().zip(&chunks) {
            assert!(
                read(*offset, CHUNK) == *chunk,
                "data at {offset} of {path:?} differs from the source"
            );
        }
        let holes = [
            (CHUNK, MIB),
            (GIB - MIB, MIB),
            (GIB + 8 * 1024, 4096),
            (GIB + 12 * 1024 + CHUNK, 64 * 1024),
            (3 * GIB, 4 * MIB),
            (size - CHUNK - MIB, MIB),
        ];
        for (offset, len) in holes {
            assert!(
                read(offset, len).iter().all(|b| *b == 0),
                "hole at {offset} (+{len}) of {path:?} reads non-zero bytes"
            );
        }
        // Across the edges of a data region: the tail of the chunk, then zeros.
        let edge = offsets[2] + CHUNK;
        let bytes = read(edge - 100, 200);
        assert_eq!(&bytes[..100], &chunks[2][CHUNK as usize - 100..]);
        assert!(bytes[100..].iter().all(|b| *b == 0));
        let bytes = read(offsets[2] - 100, 200);
        assert!(bytes[..100].iter().all(|b| *b == 0));
        assert_eq!(&bytes[100..], &chunks[2][..100]);
        assert_eq!(
            pread(&file, size - 1, 10).unwrap(),
            [chunks[3][CHUNK as usize - 1]]
        );
    }
    mount.unmount();
}

#[test]
fn images_appear_and_disappear_without_remount() {
    if !can_mount("images_appear_and_disappear_without_remount") {
        return;
    }
    let mut pool = TestPool::new(2);
    let first = pool.path("first.img");
    random_file(&first, MIB, 70);
    let first_uuid = pool.add_image("first", &first, 1);
    let first_data = fs::read(&first).unwrap();
    let mut mount = pool.mount();

    let source = pool.path("new.img");
    random_file(&source, MIB, 71);
    let data = fs::read(&source).unwrap();
    let uuid = pool.add_image("new", &source, 1);
    let mut paths = vec![mount.image("new")];
    for (i, disk) in pool.disks.iter().enumerate() {
        paths.push(mount.disk_view(&format!("d{}", i + 1), "new", &uuid));
        paths.push(mount.bound_view(disk, "new", &uuid));
    }
    let readable = |path: &PathBuf| fs::read(path).is_ok_and(|d| d == data);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || paths.iter().all(readable)),
        "a second after image add, not readable: {:?}",
        paths.iter().filter(|p| !readable(p)).collect::<Vec<_>>()
    );
    eprintln!("new image visible after {:?}", started.elapsed());
    assert_eq!(names_in(&mount.mountpoint.join("images")), ["first", "new"]);
    for disk in &pool.disks {
        assert_eq!(
            names_in(&disk.join("backing-images")),
            [format!("first-{first_uuid}"), format!("new-{uuid}")]
        );
    }

    pool.ok(&["image", "rm", "new"]);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || paths
            .iter()
            .all(|p| is_enoent(p))),
        "a second after image rm, still there: {:?}",
        paths.iter().filter(|p| !is_enoent(p)).collect::<Vec<_>>()
    );
    eprintln!("removed image gone after {:?}", started.elapsed());
    assert_eq!(names_in(&mount.mountpoint.join("images")), ["first"]);
    assert_eq!(
        fs::read(mount.image("first")).unwrap(),
        first_data,
        "the other image"
    );

    // A disk added while mounted gets its view and its bind mount.
    let d3 = pool.path("d3");
    fs::create_dir(&d3).unwrap();
    mount.disks.push(d3.clone()); // so that the guard unmounts its bind too
    pool.add_disk("d3", &d3);
    let bound = mount.bound_view(&d3, "first", &first_uuid);
    let view = mount.disk_view("d3", "first", &first_uuid);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || {
            is_mount_point(&d3.join("backing-images"))
                && fs::read(&view).is_ok_and(|d| d == first_data)
                && fs::read(&bound).is_ok_and(|d| d == first_data)
        }),
        "a second after disk add: view {:?}, bind mounted {}, bound image {:?}",
        fs::metadata(&view).map(|_| ()),
        is_mount_point(&d3.join("backing-images")),
        fs::metadata(&bound).map(|_| ())
    );
    eprintln!("new disk's view bound after {:?}", started.elapsed());
    assert_eq!(
        names_in(&mount.mountpoint.join("disks")),
        ["d1", "d2", "d3"]
    );
    assert_eq!(
        names_in(&d3.join("backing-images")),
        [format!("first-{first_uuid}")]
    );
    mount.unmount();
}

/// Waits for every mount of `mount` (binds and the mount) to be gone and its daemon to exit.
fn assert_stopped(mount: &MountGuard, after: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || mount
            .targets()
            .iter()
            .all(|t| !is_mount_point(t))),
        "{after}: still mounted: {:?}",
        mount
            .targets()
            .into_iter()
            .filter(|t| is_mount_point(t))
            .collect::<Vec<_>>()
    );
    assert!(
        wait_until(Duration::from_secs(5), || !mount.daemon_alive()),
        "{after}: the daemon {:?} still runs",
        mount.pid
    );
}

fn assert_no_mounts(pool: &TestPool, after: &str) {
    let status = pool.json(&["status"]);
    assert_eq!(
        status["mounts"].as_array().map(Vec::len),
        Some(0),
        "{after}: status lists mounts: {status}"
    );
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    if !can_mount("sigterm_and_sigint_unmount_cleanly") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, MIB, 80);
    let uuid = pool.add_image("golden", &source, 1);
    let expected = sha512sum(&source);

    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mount = pool.mount();
        assert_eq!(
            sha512sum(&mount.bound_view(&pool.disks[1], "golden", &uuid)),
            expected
        );
        kill(Pid::from_raw(mount.pid.unwrap()), signal).unwrap();
        assert_stopped(&mount, &format!("{signal}"));
        assert_no_mounts(&pool, &format!("{signal}"));
    }

    // In the foreground, as a service manager runs it.
    let mountpoint = pool.path("mnt");
    let log = pool.path("foreground.log");
    let mut mount = MountGuard {
        state: pool.state.clone(),
        mountpoint: mountpoint.clone(),
        disks: pool.disks.clone(),
        pid: None,
    };
    let mut child = ChildGuard(Some(
        pool.command(&["mount", mountpoint.to_str().unwrap(), "--foreground"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    ));
    mount.pid = Some(child.pid());
    assert!(
        wait_until(Duration::from_secs(10), || mount
            .targets()
            .iter()
            .all(|t| is_mount_point(t))),
        "mount --foreground did not mount: {}",
        fs::read_to_string(&log).unwrap()
    );
    let status = pool.json(&["status"]);
    assert_eq!(
        status["mounts"][0]["pid"].as_i64(),
        Some(child.pid() as i64),
        "{status}"
    );
    assert_eq!(sha512sum(&mount.image("golden")), expected);
    kill(Pid::from_raw(child.pid()), Signal::SIGINT).unwrap();
    let exit = child.wait_timeout(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.code() == Some(0)),
        "mount --foreground after SIGINT: {exit:?}; log: {}",
        fs::read_to_string(&log).unwrap()
    );
    assert_stopped(&mount, "SIGINT to mount --foreground");
    assert_no_mounts(&pool, "SIGINT to mount --foreground");
}

#[test]
fn mount_and_umount_errors() {
    if !can_mount("mount_and_umount_errors") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, MIB, 90);
    let data = fs::read(&source).unwrap();
    let uuid = pool.add_image("golden", &source, 1);

    let missing = pool.path("missing");
    let message = pool.fails(&["mount", missing.to_str().unwrap()]);
    assert!(
        message.contains(missing.to_str().unwrap()) && message.contains("create the directory"),
        "mount on a missing directory: {message}"
    );
    assert!(!missing.exists());
    assert_no_mounts(&pool, "mount on a missing directory");

    let mut mount = pool.mount();
    let mnt = mount.mountpoint.to_str().unwrap().to_string();
    let message = pool.fails(&["mount", &mnt]);
    assert!(
        message.contains("already a mount point"),
        "second mount at {mnt}: {message}"
    );
    assert_eq!(fs::read(mount.image("golden")).unwrap(), data);
    assert_eq!(
        pool.json(&["status"])["mounts"].as_array().unwrap().len(),
        1
    );

    let plain = pool.path("plain");
    fs::create_dir(&plain).unwrap();
    let message = pool.fails(&["umount", plain.to_str().unwrap()]);
    assert!(
        message.contains("not an imgpool mount"),
        "umount of a plain directory: {message}"
    );
    // A mount of another filesystem is not ours either, and stays mounted.
    let tmpfs = TmpfsMount::new(&pool.path("tmpfs"));
    let message = pool.fails(&["umount", tmpfs.path.to_str().unwrap()]);
    assert!(
        message.contains("not an imgpool mount"),
        "umount of a tmpfs: {message}"
    );
    assert!(is_mount_point(&tmpfs.path));
    drop(tmpfs);
    let message = pool.fails(&["umount", missing.to_str().unwrap()]);
    assert!(
        message.contains(missing.to_str().unwrap()),
        "umount of a missing directory: {message}"
    );

    let file = File::open(mount.image("golden")).unwrap();
    let message = pool.fails(&["umount", &mnt]);
    assert!(
        message.contains("busy"),
        "umount with an open file: {message}"
    );
    assert!(is_mount_point(&mount.mountpoint));
    assert!(mount.daemon_alive());
    assert_eq!(pread(&file, 0, 4096).unwrap(), &data[..4096]);
    assert_eq!(fs::read(mount.image("golden")).unwrap(), data);
    assert_eq!(
        fs::read(mount.disk_view("d2", "golden", &uuid)).unwrap(),
        data
    );

    // Lazy: detached at once, the open file keeps reading, and the daemon (and the command,
    // which waits for it) ends when the file is closed.
    let mut umount = ChildGuard(Some(
        pool.command(&["umount", "--lazy", &mnt])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    assert!(
        wait_until(Duration::from_secs(5), || mount
            .targets()
            .iter()
            .all(|t| !is_mount_point(t))),
        "umount --lazy did not detach"
    );
    assert_eq!(
        pread(&file, MIB - 10, 100).unwrap(),
        &data[MIB as usize - 10..]
    );
    drop(file);
    let exit = umount.wait_timeout(Duration::from_secs(15));
    assert!(exit.is_some_and(|s| s.success()), "umount --lazy: {exit:?}");
    assert!(
        wait_until(Duration::from_secs(5), || !mount.daemon_alive()),
        "the daemon still runs after umount --lazy and close"
    );
    mount.pid = None;
    assert_no_mounts(&pool, "umount --lazy");
}

/// A refused `umount` must change nothing: the bind mounts are the paths replicas open.
#[test]
fn failed_umount_leaves_every_bind_mount_in_place() {
    if !can_mount("failed_umount_leaves_every_bind_mount_in_place") {
        return;
    }
    let pool = TestPool::new(3);
    let source = pool.path("source.img");
    random_file(&source, MIB, 95);
    let data = fs::read(&source).unwrap();
    let uuid = pool.add_image("golden", &source, 1);
    let mount = pool.mount();
    let mnt = mount.mountpoint.to_str().unwrap().to_string();

    // Busy through the mount, and busy through one disk's bind mount (a replica's open).
    for opened in [
        mount.image("golden"),
        mount.bound_view(&pool.disks[1], "golden", &uuid),
    ] {
        let file = File::open(&opened).unwrap();
        let message = pool.fails(&["umount", &mnt]);
        assert!(
            message.contains("busy"),
            "umount with {opened:?} open: {message}"
        );
        for target in mount.targets() {
            assert!(
                is_mount_point(&target),
                "a failed umount (file {opened:?} open) unmounted {target:?}"
            );
        }
        for disk in &pool.disks {
            assert_eq!(
                fs::read(mount.bound_view(disk, "golden", &uuid)).unwrap(),
                data
            );
        }
        drop(file);
        assert!(wait_until(Duration::from_secs(5), || open_handles(
            &pool, "golden"
        ) == 0));
    }
    mount.unmount();
}

#[test]
fn non_root_is_refused_where_root_is_needed() {
    if !can_mount("non_root_is_refused_where_root_is_needed") {
        return;
    }
    const NOBODY: u32 = 65534;
    let pool = TestPool::new(1);
    let source = pool.path("source.img");
    random_file(&source, MIB, 100);
    pool.add_image("golden", &source, 1);
    let mount = pool.mount();
    let mnt = mount.mountpoint.to_str().unwrap().to_string();
    let other = pool.path("other");
    fs::create_dir(&other).unwrap();
    fs::set_permissions(&pool.state, fs::Permissions::from_mode(0o700)).unwrap();
    let as_nobody = |args: &[&str]| pool.command(args).uid(NOBODY).gid(NOBODY).output().unwrap();

    // The state directory is private to root (as /var/lib/imgpool is): only a root check made
    // before the pool is opened can say why the command is refused.
    assert!(
        !as_nobody(&["status"]).status.success(),
        "nobody can read the test pool's state directory, so this test proves nothing"
    );
    for args in [
        vec!["mount", other.to_str().unwrap()],
        vec!["mount", other.to_str().unwrap(), "--foreground"],
        vec!["mount", "/nonexistent/dir"],
        vec!["umount", &mnt],
        vec!["umount", "--lazy", &mnt],
        vec!["umount", other.to_str().unwrap()],
    ] {
        let what = format!("imgpool {args:?} as nobody");
        let message = failed_cleanly(&what, &as_nobody(&args));
        assert!(message.contains("needs root"), "{what}: {message}");
    }
    assert!(!is_mount_point(&other));
    assert!(is_mount_point(&mount.mountpoint));
    assert!(is_mount_point(&pool.disks[0].join("backing-images")));
    assert_eq!(
        pool.json(&["status"])["mounts"].as_array().unwrap().len(),
        1
    );
    assert_eq!(sha512sum(&mount.image("golden")), sha512sum(&source));
    mount.unmount();
}
