//! Volume commands through the real binary, without a mount: create, list, show, resize and
//! remove; the volume as a holder of its image; every bad input refused with one line and
//! nothing changed.

mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

fn volume_names(pool: &TestPool) -> Vec<String> {
    pool.json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_volume_is_created_listed_grown_and_removed_and_holds_its_image() {
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 3 * MIB + 100, 7);
    pool.add_image("base", &source, 1);

    let created = pool.json(&["volume", "create", "vm1", "--image", "base", "--disk", "d2"]);
    // The image's size rounded up to 4 KiB.
    assert_eq!(created["size"], 3 * MIB + 4096);
    assert_eq!(created["image"], "base");
    assert_eq!(created["disk"], "d2");
    assert_eq!(created["state"], "ready");
    assert_eq!(created["snapshots"], 0);
    let uuid = created["uuid"].as_str().unwrap();
    let dir = pool.disks[1].join(".imgpool/volumes").join(uuid);
    for file in ["volume.json", "index.db", "data"] {
        assert!(dir.join(file).is_file(), "{file} missing in {dir:?}");
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("volume.json")).unwrap()).unwrap();
    assert_eq!(record["name"], "vm1");
    assert_eq!(record["base"]["name"], "base");

    // Without --disk: the disk with the most free space; without --image: zeros, size needed.
    pool.ok(&["volume", "create", "scratch", "--size", "1GiB"]);
    let scratch = pool.json(&["volume", "show", "scratch"]);
    assert_eq!(scratch["size"], 1u64 << 30);
    assert!(scratch["image"].is_null());
    assert_eq!(volume_names(&pool), ["scratch", "vm1"]);
    let table = pool.ok(&["volume", "list"]);
    assert!(table.contains("vm1") && table.contains("base"), "{table}");

    // The volume holds its image: neither rm nor gc takes it.
    let out = pool.run(&["image", "rm", "base"]);
    let line = failed_cleanly("image rm of an image a volume uses", &out);
    assert!(line.contains("volume vm1"), "{line}");
    let collectable = pool.json(&["gc", "--grace", "0s", "--dry-run"]);
    assert!(
        !collectable.to_string().contains("base"),
        "gc would take an image a volume uses: {collectable}"
    );
    pool.ok(&["gc", "--grace", "0s"]);
    assert_eq!(pool.json(&["image", "list"]).as_array().unwrap().len(), 1);
    let holders = pool.ok(&["ref", "list", "base"]);
    assert!(holders.contains("volume vm1"), "{holders}");

    pool.ok(&["volume", "resize", "vm1", "8MiB"]);
    assert_eq!(pool.json(&["volume", "show", "vm1"])["size"], 8 * MIB);

    pool.ok(&["volume", "rm", "vm1"]);
    assert!(!dir.exists(), "the volume's directory is left behind");
    assert_eq!(volume_names(&pool), ["scratch"]);
    pool.ok(&["image", "rm", "base"]);
}

#[test]
fn bad_volume_commands_fail_with_one_line_and_change_nothing() {
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, 2 * MIB, 8);
    pool.add_image("base", &source, 1);
    pool.ok(&["volume", "create", "vm1", "--image", "base"]);
    let before = pool.ok(&["volume", "list", "--json"]);
    let files = |p: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(p.join(".imgpool/volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let disk_before = files(&pool.disks[0]);

    let cases: &[(&[&str], &str)] = &[
        (
            &["volume", "create", "v2", "--image", "nope"],
            "no image named 'nope'",
        ),
        (
            &[
                "volume", "create", "v2", "--image", "base", "--size", "5000000",
            ],
            "multiple of 4096",
        ),
        (
            &[
                "volume", "create", "v2", "--image", "base", "--size", "1MiB",
            ],
            "at least its size",
        ),
        (
            &["volume", "create", "base", "--size", "1MiB"],
            "name of an image",
        ),
        (
            &["volume", "create", "vm1", "--size", "1MiB"],
            "name of a volume",
        ),
        (&["volume", "create", "v2"], "needs a size"),
        (
            &["volume", "create", "v2", "--size", "1MiB", "--disk", "d9"],
            "d9",
        ),
        (
            &["volume", "create", "bad/name", "--size", "1MiB"],
            "bad/name",
        ),
        (
            &["volume", "create", "v2", "--size", "0"],
            "multiple of 4096",
        ),
        (&["volume", "resize", "vm1", "1MiB"], "cannot shrink"),
        (&["volume", "resize", "vm1", "3000001"], "multiple of 4096"),
        (
            &["volume", "resize", "nope", "8MiB"],
            "no volume named 'nope'",
        ),
        (&["volume", "show", "nope"], "no volume named 'nope'"),
        (&["volume", "rm", "nope"], "no volume named 'nope'"),
    ];
    for (args, expected) in cases {
        let out = pool.run(args);
        let line = failed_cleanly(&args.join(" "), &out);
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    // An image may not take a volume's name either.
    let out = pool.run(&["image", "add", "vm1", source.to_str().unwrap()]);
    let line = failed_cleanly("image add with a volume's name", &out);
    assert!(line.contains("name of a volume"), "{line}");

    assert_eq!(pool.ok(&["volume", "list", "--json"]), before);
    assert_eq!(files(&pool.disks[0]), disk_before);
}

#[test]
fn concurrent_creates_of_one_name_make_one_volume() {
    let pool = TestPool::new(2);
    let children: Vec<_> = (0..6)
        .map(|_| {
            pool.command(&["volume", "create", "race", "--size", "4MiB"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "exactly one create wins");
    for out in outcomes.iter().filter(|o| !o.status.success()) {
        let line = failed_cleanly("a losing create", out);
        assert!(line.contains("name of a volume"), "{line}");
    }
    assert_eq!(volume_names(&pool), ["race"]);
    // One directory on the disks: the losers left nothing.
    let dirs: usize = pool
        .disks
        .iter()
        .map(|d| {
            std::fs::read_dir(d.join(".imgpool/volumes"))
                .map(|r| r.count())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(dirs, 1);
}
