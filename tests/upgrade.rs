//! A pool made by an older imgpool opens with this one: its store is upgraded in place, with
//! everything in it, and a store newer than this binary is refused.

mod common;

use std::fs;
use std::process::Command;

use common::*;

/// Where the fixture's store says its disks are (see tests/fixtures/README.md).
const FIXTURE_DIR: &str = "/tmp/imgpool-v2-fixture";
const ALPINE_SHA512: &str = "989bb2b9a7dd7ed9b833b32bbeb7277d762a886239a0f87e2bfa9624583bff6fb322c0bbf7802bc5a9e94603afafd0f7f4a8b9330158c3c13e58e6856caa7274";
const SMALL_SHA512: &str = "765efe61e17f06be81848d658811beca31e04d70ae1907e6d1c5dba040e3056b61c580df0d8a2405602e5872128e64ed78153afb4e4db095a38df53f1b4530ee";

/// The pool made by imgpool at 374c796 (schema version 2), unpacked in a temporary directory,
/// its disks pointed at the unpacked copies.
fn version_2_pool() -> TestPool {
    let dir = tempfile::Builder::new()
        .prefix("imgpool-upgrade.")
        .tempdir()
        .unwrap();
    let archive = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pool-v2-374c796.tar.gz"
    );
    let status = Command::new("tar")
        .args(["-xzf", archive, "-C"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let root = dir.path().join("imgpool-v2-fixture");
    let db = root.join("state/pool.db");
    {
        // Only the disks' location changes; the schema and every row stay as version 2 wrote
        // them.
        let conn = rusqlite::Connection::open(&db).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2, "the fixture is a version 2 store");
        conn.execute(
            "UPDATE disks SET path = replace(path, ?1, ?2)",
            [FIXTURE_DIR, root.to_str().unwrap()],
        )
        .unwrap();
    }
    TestPool {
        state: root.join("state"),
        disks: vec![root.join("d1"), root.join("d2")],
        dir,
    }
}

fn user_version(pool: &TestPool) -> i64 {
    let conn = rusqlite::Connection::open(pool.state.join("pool.db")).unwrap();
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_version_2_pool_is_upgraded_in_place_with_everything_in_it() {
    let pool = version_2_pool();
    let images = pool.json(&["image", "list"]);
    let names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpine", "small"]);
    assert!(user_version(&pool) > 2, "the store was upgraded");
    assert!(
        pool.state.join("pool.db.v2-backup").exists(),
        "the version 2 store is kept beside the upgraded one"
    );

    let alpine = pool.json(&["image", "show", "alpine"]);
    assert_eq!(alpine["sha512"], ALPINE_SHA512);
    assert_eq!(alpine["size"], 200000);
    assert_eq!(alpine["copies_wanted"], 2);
    assert_eq!(alpine["holders"], serde_json::json!(["replica-1"]));
    assert_eq!(alpine["state"], "degraded", "{alpine}");
    let copies = alpine["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 2);
    assert_eq!(copies[0]["disk"], "d1");
    assert_eq!(copies[0]["serving"], true);
    assert_eq!(copies[1]["disk"], "d2");
    assert_eq!(copies[1]["serving"], false, "d2 was failed by hand");
    let small = pool.json(&["image", "show", "small"]);
    assert_eq!(small["sha512"], SMALL_SHA512);

    let disks = pool.json(&["disk", "list"]);
    let d2 = &disks.as_array().unwrap()[1];
    assert_eq!(d2["state"], "failed");
    assert!(
        d2["problem"]
            .as_str()
            .unwrap()
            .contains("fixture: failed by hand"),
        "{d2}"
    );
    assert_eq!(pool.json(&["config", "list"])["repair-jobs"], 3);

    // The upgraded pool works: d2 comes back, its copy is verified, the policy is met.
    pool.ok(&["disk", "online", "d2"]);
    pool.ok(&["repair"]);
    let alpine = pool.json(&["image", "show", "alpine"]);
    assert_eq!(alpine["state"], "ready", "{alpine}");
    assert_eq!(alpine["healthy_copies"], 2);
    for copy in alpine["copies"].as_array().unwrap() {
        let path = copy["path"].as_str().unwrap();
        assert_eq!(sha512sum(path.as_ref()), ALPINE_SHA512);
    }
    pool.ok(&["fsck"]);
}

#[test]
fn a_store_newer_than_this_imgpool_is_refused_and_left_as_it_is() {
    let pool = version_2_pool();
    pool.ok(&["image", "list"]);
    let upgraded = user_version(&pool);
    {
        let conn = rusqlite::Connection::open(pool.state.join("pool.db")).unwrap();
        conn.pragma_update(None, "user_version", upgraded + 5)
            .unwrap();
    }
    let before = fs::read(pool.state.join("pool.db")).unwrap();
    let line = pool.fails(&["image", "list"]);
    assert!(line.contains("newer than this imgpool"), "{line}");
    assert_eq!(user_version(&pool), upgraded + 5);
    assert_eq!(fs::read(pool.state.join("pool.db")).unwrap(), before);
}

#[test]
fn commands_opening_a_version_2_pool_at_once_upgrade_it_once() {
    let pool = version_2_pool();
    let children: Vec<_> = (0..4)
        .map(|_| {
            pool.command(&["image", "list", "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let images: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(images.as_array().unwrap().len(), 2);
    }
    assert!(user_version(&pool) > 2);
    let alpine = pool.json(&["image", "show", "alpine"]);
    assert_eq!(alpine["holders"], serde_json::json!(["replica-1"]));
}
