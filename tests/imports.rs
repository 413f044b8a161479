//! Images in the formats users have: qcow2 files made by the real `qemu-img` and `qemu-io`
//! (plain, over a backing chain, compressed with zlib and zstd, extended L2) import to the bytes
//! `qemu-img convert -O raw` gives, storing only the data; Longhorn replica directories built
//! here in the engine's layout import to the merged bytes a model of the chain computes; bad
//! inputs of both are refused with one line and leave the pool as it was.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;
use sha2::{Digest, Sha512};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// Runs a qemu tool that must succeed (scripts/deps.sh installs qemu-utils).
fn qemu(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}: run scripts/deps.sh (package qemu-utils)"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-io -c 'write -P 0xNN off len'` for each (pattern, offset, length); pattern 0 writes
/// zeros the qcow2 way (`write -z`: a zero cluster or subcluster, no data).
fn qemu_write(image: &Path, writes: &[(u8, u64, u64)]) {
    let mut args = Vec::new();
    for &(pattern, offset, len) in writes {
        args.push("-c".to_string());
        args.push(if pattern == 0 {
            format!("write -z {offset} {len}")
        } else {
            format!("write -P {pattern:#x} {offset} {len}")
        });
    }
    args.push(s(image).to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu("qemu-io", &args);
}

/// The raw bytes QEMU itself reads from `image`.
fn qemu_raw(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("expected-raw");
    qemu("qemu-img", &["convert", "-O", "raw", s(image), s(&raw)]);
    let bytes = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    bytes
}

fn sha512_hex(bytes: &[u8]) -> String {
    hex::encode(Sha512::digest(bytes))
}

/// Bytes in the 4 KiB blocks of `bytes` that are not all zeros: what a sparse copy stores.
fn data_bytes(bytes: &[u8]) -> u64 {
    bytes
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum()
}

/// Checks that image `name` of the pool holds exactly `expected`, storing only its data.
fn assert_image_is(pool: &TestPool, name: &str, expected: &[u8]) {
    let info = pool.json(&["image", "show", name]);
    assert_eq!(info["size"], json!(expected.len()), "{name}: size");
    assert_eq!(
        info["sha512"],
        json!(sha512_hex(expected)),
        "{name}: content"
    );
    // Allocated blocks of the copy: the data, plus at most a few blocks of the filesystem's
    // own extent tree.
    let (stored, data) = (info["stored_bytes"].as_u64().unwrap(), data_bytes(expected));
    assert!(
        (data..=data + 64 * 1024).contains(&stored),
        "{name}: {stored} bytes stored for {data} bytes of data"
    );
}

/// What a refused import must leave: no image, no file on any disk.
fn assert_pool_untouched(pool: &TestPool) {
    assert_eq!(pool.json(&["image", "list"]), json!([]));
    for disk in &pool.disks {
        for sub in ["copies", "tmp"] {
            if let Ok(entries) = fs::read_dir(disk.join(".imgpool").join(sub)) {
                let left: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
                assert!(left.is_empty(), "left behind: {left:?}");
            }
        }
    }
}

#[test]
fn qcow2_images_import_to_the_bytes_qemu_reads_and_store_only_their_data() {
    let pool = TestPool::new(1);
    let dir = pool.path("images");
    fs::create_dir(&dir).unwrap();

    // A chain of three, each level writing over the one below, with zero writes that hide
    // data of the base; the top is larger than its backing files.
    let base = dir.join("base.qcow2");
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), "48M"],
    );
    qemu_write(
        &base,
        &[
            (0x11, 0, 3 * MIB),
            (0x12, 20 * MIB, 300 << 10),
            (0x13, 47 * MIB, MIB),
        ],
    );
    let mid = dir.join("mid.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&mid),
        ],
    );
    qemu_write(
        &mid,
        &[
            (0x21, MIB + 512, 2 * MIB),
            (0, 20 * MIB, 64 << 10),
            (0x22, 30 * MIB, 4096),
        ],
    );
    let top = dir.join("top.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "64M",
        ],
    );
    qemu_write(
        &top,
        &[
            (0x31, 100 << 10, 4096),
            (0, 2 * MIB, 4096),
            (0x32, 60 * MIB, 5 * MIB / 2),
        ],
    );

    // Standalone images of the same disk: plain, compressed (zlib and zstd).
    let flat = dir.join("flat.qcow2");
    qemu("qemu-img", &["convert", "-O", "qcow2", s(&top), s(&flat)]);
    let zlib = dir.join("zlib.qcow2");
    qemu(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", s(&top), s(&zlib)],
    );
    let zstd = dir.join("zstd.qcow2");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            s(&top),
            s(&zstd),
        ],
    );
    // Extended L2 over the chain: 4 KiB subclusters of 128 KiB clusters, some allocated, some
    // zero, the rest from the backing file.
    let extended = dir.join("extended.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            s(&extended),
        ],
    );
    qemu_write(
        &extended,
        &[
            (0x41, 4096, 4096),
            (0x42, 200 << 10, 12 << 10),
            (0, MIB, 4096),
            (0x43, 63 * MIB, 4096),
        ],
    );
    // Compressed clusters over a raw backing file whose data ends 4 KiB before them: the
    // extent starts mid-cluster, so the import's 1 MiB reads end inside compressed clusters.
    let raw_base = dir.join("raw-base.img");
    let f = File::create(&raw_base).unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&[0x51; 4096], 60 << 10).unwrap();
    f.write_all_at(&[0x52; 8192], 5 * MIB).unwrap();
    let over_raw = dir.join("over-raw.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "raw-base.img",
            "-F",
            "raw",
            s(&over_raw),
        ],
    );
    qemu_write(&over_raw, &[(0x61, 64 << 10, 3 * MIB)]);
    let compressed_over_raw = dir.join("compressed-over-raw.qcow2");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-B",
            "raw-base.img",
            "-F",
            "raw",
            s(&over_raw),
            s(&compressed_over_raw),
        ],
    );

    // The format comes from the content: a qcow2 named like a raw file.
    let misnamed = dir.join("disk.raw");
    fs::copy(&flat, &misnamed).unwrap();

    let expected = qemu_raw(&top);
    assert_eq!(expected.len() as u64, 64 * MIB);
    for (name, image) in [
        ("chain", &top),
        ("flat", &flat),
        ("zlib", &zlib),
        ("zstd", &zstd),
        ("misnamed", &misnamed),
    ] {
        pool.add_image(name, image, 1);
        assert_image_is(&pool, name, &expected);
    }
    pool.add_image("extended", &extended, 1);
    assert_image_is(&pool, "extended", &qemu_raw(&extended));
    pool.add_image("compressed-over-raw", &compressed_over_raw, 1);
    assert_image_is(
        &pool,
        "compressed-over-raw",
        &qemu_raw(&compressed_over_raw),
    );

    // A raw file named like a qcow2 stays raw: its bytes are the image.
    let raw_named_qcow2 = dir.join("really-raw.qcow2");
    fs::write(&raw_named_qcow2, &expected[..8 * MIB as usize]).unwrap();
    pool.add_image("raw", &raw_named_qcow2, 1);
    assert_image_is(&pool, "raw", &expected[..8 * MIB as usize]);

    // Read back through the mount by a real client; and a qcow2 on a block device (a loop
    // device here, LVM in real life), whose st_size is 0.
    if can_mount("qcow2 import read back through the mount") {
        let device = LoopDevice(attach_loop(&flat));
        pool.add_image("on-device", Path::new(&device.0), 1);
        assert_image_is(&pool, "on-device", &expected);
        drop(device);

        let mount = pool.mount();
        assert_eq!(sha512sum(&mount.image("chain")), sha512_hex(&expected));
        assert_eq!(sha512sum(&mount.image("zstd")), sha512_hex(&expected));
        mount.unmount();
    }
}

/// A loop device the test attached; detached on drop, also when the test fails.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn bad_qcow2_files_are_refused_with_one_line_and_change_nothing() {
    let pool = TestPool::new(1);
    let dir = pool.path("images");
    fs::create_dir(&dir).unwrap();
    let good = dir.join("good.qcow2");
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&good), "16M"],
    );
    qemu_write(&good, &[(0x5a, 0, 2 * MIB)]);
    let copy_with = |name: &str, patch: &[(u64, &[u8])]| -> PathBuf {
        let path = dir.join(name);
        fs::copy(&good, &path).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for (offset, bytes) in patch {
            file.write_all_at(bytes, *offset).unwrap();
        }
        path
    };
    let refused = |path: &Path| -> String {
        let line = pool.fails(&["image", "add", "x", s(path)]);
        assert_pool_untouched(&pool);
        line
    };

    // A backing file that is not there: named in the message.
    let orphan = dir.join("orphan.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            s(&orphan),
            "16M",
        ],
    );
    let line = refused(&orphan);
    assert!(
        line.contains("gone.qcow2") && line.contains("is missing"),
        "{line}"
    );

    // Encrypted (LUKS, with a secret).
    let encrypted = dir.join("encrypted.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=passphrase",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            s(&encrypted),
            "16M",
        ],
    );
    let line = refused(&encrypted);
    assert!(line.contains("encrypted"), "{line}");

    // Corrupt headers: cut short, cluster bits out of range, an L1 table past the end.
    let truncated = dir.join("truncated.qcow2");
    fs::write(&truncated, &fs::read(&good).unwrap()[..60]).unwrap();
    let line = refused(&truncated);
    assert!(line.contains("damaged qcow2"), "{line}");
    let line = refused(&copy_with("bits.qcow2", &[(20, &48u32.to_be_bytes())]));
    assert!(
        line.contains("damaged qcow2") && line.contains("cluster_bits 48"),
        "{line}"
    );
    let line = refused(&copy_with("l1.qcow2", &[(40, &(1u64 << 40).to_be_bytes())]));
    assert!(
        line.contains("damaged qcow2") && line.contains("L1 table"),
        "{line}"
    );

    let line = refused(&copy_with(
        "huge.qcow2",
        &[(24, &(1u64 << 60).to_be_bytes())],
    ));
    assert!(
        line.contains("damaged qcow2") && line.contains("virtual size"),
        "{line}"
    );

    // A table entry pointing past the end of the file is found while copying.
    let l1_offset = {
        let mut b = [0u8; 8];
        File::open(&good)
            .unwrap()
            .read_exact_at(&mut b, 40)
            .unwrap();
        u64::from_be_bytes(b)
    };
    let line = refused(&copy_with(
        "l2.qcow2",
        &[(
            l1_offset,
            &(0x8000_0000_0000_0000u64 | 1 << 40).to_be_bytes(),
        )],
    ));
    assert!(
        line.contains("damaged qcow2") && line.contains("L2 table"),
        "{line}"
    );

    // Unsupported: another version, an unknown incompatible feature, an external data file.
    let line = refused(&copy_with("v4.qcow2", &[(4, &4u32.to_be_bytes())]));
    assert!(
        line.contains("version 4") && line.contains("does not read"),
        "{line}"
    );
    let line = refused(&copy_with(
        "feature.qcow2",
        &[(72, &(1u64 << 9).to_be_bytes())],
    ));
    assert!(line.contains("incompatible feature bit 9"), "{line}");
    // Compression types beyond zlib (0) and zstd (1): the type byte follows the v3 header.
    let line = refused(&copy_with(
        "lz.qcow2",
        &[(72, &(1u64 << 3).to_be_bytes()), (104, &[2])],
    ));
    assert!(line.contains("compression type 2"), "{line}");
    let external = dir.join("external.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s(&dir.join("external.data"))),
            s(&external),
            "16M",
        ],
    );
    let line = refused(&external);
    assert!(line.contains("external data file"), "{line}");
}

/// A small deterministic generator: the layers' writes differ per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One layer of a Longhorn chain: scattered runs of 4 KiB blocks, some of them zeros (data on
/// disk all the same, which hides the layers below as Longhorn reads it).
struct Layer {
    file: String,
    parent: String,
    writes: Vec<(u64, Vec<u8>)>,
}

fn scattered_writes(size: u64, seed: u64, count: usize) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng(seed);
    let blocks = size / BLOCK as u64;
    (0..count)
        .map(|i| {
            let run = 1 + rng.next() % 4;
            let start = rng.next() % (blocks - run);
            let data: Vec<u8> = if i % 5 == 0 {
                vec![0; (run as usize) * BLOCK]
            } else {
                (0..run as usize * BLOCK)
                    .map(|_| rng.next() as u8 | 1)
                    .collect()
            };
            (start * BLOCK as u64, data)
        })
        .collect()
}

/// A replica directory in the engine's layout, and the bytes each layer's state reads as
/// (computed here from the writes, independently of any extent map).
struct ReplicaFixture {
    dir: PathBuf,
    backing: PathBuf,
    size: u64,
    backing_bytes: Vec<u8>,
    layers: Vec<Layer>,
}

impl ReplicaFixture {
    /// Backing file, then snapshots s1 <- s2 <- s3, then the head `volume-head-004.img`.
    fn new(root: &Path) -> ReplicaFixture {
        let size = 16 * MIB;
        let dir = root.join("replica");
        fs::create_dir_all(&dir).unwrap();
        let backing_dir = root.join("backing-images").join("golden-1234");
        fs::create_dir_all(&backing_dir).unwrap();
        let backing = backing_dir.join("backing");
        // The backing file is shorter than the volume: beyond it the volume reads zeros.
        let backing_len = 12 * MIB;
        let mut backing_bytes = vec![0u8; backing_len as usize];
        let f = File::create(&backing).unwrap();
        f.set_len(backing_len).unwrap();
        for (offset, data) in scattered_writes(backing_len, 7, 60) {
            f.write_all_at(&data, offset).unwrap();
            backing_bytes[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        let names = [
            "volume-snap-s1.img",
            "volume-snap-s2.img",
            "volume-snap-s3.img",
            "volume-head-004.img",
        ];
        let layers: Vec<Layer> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Layer {
                file: name.to_string(),
                parent: if i == 0 {
                    String::new()
                } else {
                    names[i - 1].to_string()
                },
                writes: scattered_writes(size, 100 + i as u64, 80),
            })
            .collect();
        for layer in &layers {
            let f = File::create(dir.join(&layer.file)).unwrap();
            f.set_len(size).unwrap();
            for (offset, data) in &layer.writes {
                f.write_all_at(data, *offset).unwrap();
            }
            f.sync_all().unwrap();
            let meta = json!({
                "Name": layer.file, "Parent": layer.parent, "Removed": false,
                "UserCreated": true, "Created": "2026-11-30T06:00:00Z", "Labels": null,
            });
            fs::write(dir.join(format!("{}.meta", layer.file)), meta.to_string()).unwrap();
        }
        let fixture = ReplicaFixture {
            dir,
            backing,
            size,
            backing_bytes,
            layers,
        };
        fixture.write_volume_meta(false);
        fs::write(fixture.dir.join("revision.counter"), "42").unwrap();
        fixture
    }

    fn write_volume_meta(&self, rebuilding: bool) {
        let meta = json!({
            "Size": self.size, "Head": "volume-head-004.img", "Dirty": false,
            "Rebuilding": rebuilding, "Error": "", "Parent": "volume-snap-s3.img",
            "SectorSize": 512, "BackingFilePath": s(self.backing.parent().unwrap()),
            "Encrypted": false,
        });
        fs::write(self.dir.join("volume.meta"), meta.to_string()).unwrap();
    }

    /// The disk as of layer `upto` (0 = s1 .. 3 = head): the backing file, then each layer's
    /// writes in order, newer over older.
    fn expected(&self, upto: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; self.size as usize];
        bytes[..self.backing_bytes.len()].copy_from_slice(&self.backing_bytes);
        for layer in &self.layers[..=upto] {
            for (offset, data) in &layer.writes {
                bytes[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        bytes
    }
}

#[test]
fn longhorn_replicas_import_as_their_merged_chain_at_the_head_and_at_a_snapshot() {
    let pool = TestPool::new(1);
    let replica = ReplicaFixture::new(pool.dir.path());
    let dir = s(&replica.dir);

    pool.ok(&["image", "add", "head", "--from-longhorn-replica", dir]);
    assert_image_is(&pool, "head", &replica.expected(3));
    pool.ok(&[
        "image",
        "add",
        "at-s2",
        "--from-longhorn-replica",
        dir,
        "--snapshot",
        "s2",
    ]);
    assert_image_is(&pool, "at-s2", &replica.expected(1));
    // The snapshot's file name is accepted too.
    pool.ok(&[
        "image",
        "add",
        "at-s1",
        "--from-longhorn-replica",
        dir,
        "--snapshot",
        "volume-snap-s1.img",
    ]);
    assert_image_is(&pool, "at-s1", &replica.expected(0));

    // A replica copied without its backing file names it; --backing-file points elsewhere.
    let moved = pool.path("moved-backing");
    fs::rename(&replica.backing, &moved).unwrap();
    let line = pool.fails(&["image", "add", "lost", "--from-longhorn-replica", dir]);
    assert!(
        line.contains("backing file") && line.contains("golden-1234"),
        "{line}"
    );
    pool.ok(&[
        "image",
        "add",
        "moved",
        "--from-longhorn-replica",
        dir,
        "--backing-file",
        s(&moved),
    ]);
    assert_image_is(&pool, "moved", &replica.expected(3));
    // A qcow2 backing file, as Longhorn also takes.
    let as_qcow2 = pool.path("backing.qcow2");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&moved),
            s(&as_qcow2),
        ],
    );
    pool.ok(&[
        "image",
        "add",
        "over-qcow2",
        "--from-longhorn-replica",
        dir,
        "--backing-file",
        s(&as_qcow2),
    ]);
    assert_image_is(&pool, "over-qcow2", &replica.expected(3));
}

#[test]
fn longhorn_replicas_that_are_not_whole_or_not_at_rest_are_refused() {
    let pool = TestPool::new(1);
    let replica = ReplicaFixture::new(pool.dir.path());
    let dir = s(&replica.dir);
    let refused = |args: &[&str]| -> String {
        let mut all = vec!["image", "add", "x", "--from-longhorn-replica"];
        all.extend_from_slice(args);
        let line = pool.fails(&all);
        assert_pool_untouched(&pool);
        line
    };

    // Not a replica: no volume.meta.
    let empty = pool.path("empty");
    fs::create_dir(&empty).unwrap();
    let line = refused(&[s(&empty)]);
    assert!(line.contains("not a Longhorn replica"), "{line}");
    let line = refused(&[s(&replica.dir.join("volume.meta"))]);
    assert!(line.contains("not a directory"), "{line}");

    // An unknown snapshot: the known ones are listed.
    let line = refused(&[dir, "--snapshot", "nope"]);
    assert!(
        line.contains("no snapshot 'nope'") && line.contains("s1, s2, s3"),
        "{line}"
    );

    // Being rebuilt.
    replica.write_volume_meta(true);
    let line = refused(&[dir]);
    assert!(line.contains("being rebuilt"), "{line}");
    replica.write_volume_meta(false);

    // Open by a process (a replica process holds its layer files open).
    let mut holder = ChildGuard(Some(
        Command::new("bash")
            .args(["-c", "exec 3<\"$1\"; echo ready; exec sleep 600", "holder"])
            .arg(replica.dir.join("volume-head-004.img"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    {
        use std::io::Read;
        let mut ready = [0u8; 6];
        holder
            .0
            .as_mut()
            .unwrap()
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .unwrap();
    }
    let line = refused(&[dir]);
    assert!(
        line.contains("is open by") && line.contains(&format!("pid {}", holder.pid())),
        "{line}"
    );
    drop(holder);

    // Missing links: a layer's metadata, then a layer's file.
    let meta = replica.dir.join("volume-snap-s2.img.meta");
    let saved = fs::read(&meta).unwrap();
    fs::remove_file(&meta).unwrap();
    let line = refused(&[dir]);
    assert!(
        line.contains("broken") && line.contains("volume-snap-s2.img.meta is missing"),
        "{line}"
    );
    fs::write(&meta, saved).unwrap();
    fs::remove_file(replica.dir.join("volume-snap-s1.img")).unwrap();
    let line = refused(&[dir, "--snapshot", "s3"]);
    assert!(
        line.contains("broken") && line.contains("volume-snap-s1.img cannot be opened"),
        "{line}"
    );
}

/// Flips a byte of the only copy of `name` where it holds data, as a rotting disk would.
fn rot(pool: &TestPool, name: &str, at: u64) {
    let info = pool.json(&["image", "show", name]);
    let path = PathBuf::from(info["copies"][0]["path"].as_str().unwrap());
    let mut perms = fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&path, perms).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
}

#[test]
fn a_rotten_copy_comes_back_from_its_qcow2_source_but_not_from_a_replica() {
    let pool = TestPool::new(2);
    let dir = pool.path("images");
    fs::create_dir(&dir).unwrap();
    let base = dir.join("base.qcow2");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    qemu_write(&base, &[(0x71, 0, MIB)]);
    let top = dir.join("top.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_write(&top, &[(0x72, 4 * MIB, 64 << 10)]);
    pool.add_image("from-qcow2", &top, 1);
    let replica = ReplicaFixture::new(pool.dir.path());
    pool.ok(&[
        "image",
        "add",
        "from-replica",
        "--from-longhorn-replica",
        s(&replica.dir),
    ]);
    let replica_bytes = replica.expected(3);
    let data_at = replica_bytes.iter().position(|&b| b != 0).unwrap() as u64;

    rot(&pool, "from-qcow2", 100);
    rot(&pool, "from-replica", data_at);
    assert_eq!(
        pool.run(&["scrub"]).status.code(),
        Some(1),
        "scrub finds both"
    );
    let out = pool.run(&["repair"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");

    // The qcow2 file (through its backing file) is read again, by the qcow2 reader.
    assert_image_is(&pool, "from-qcow2", &qemu_raw(&top));
    assert_eq!(
        pool.json(&["image", "show", "from-qcow2"])["state"],
        json!("ready")
    );
    // A replica is no file to read again (and its head moves on): the repair says so.
    assert!(
        stderr.contains("(longhorn replica")
            && stderr.contains("not a file the repair can read again"),
        "{stderr}"
    );
    assert_eq!(
        pool.json(&["image", "show", "from-replica"])["state"],
        json!("degraded")
    );
}
