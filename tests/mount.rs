//! The FUSE views, tested through a real mount with real clients (sha512sum, dd, mmap).

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

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
