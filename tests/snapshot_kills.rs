//! A batch deletion of 10,000 snapshots and its reclaim, killed with `kill -9` at random
//! instants: of the mount daemon doing it for a volume it has open, or of the command doing it
//! itself on a pool that is not mounted. After each kill and a restart: the batch is listed
//! whole or not at all, the volume and the snapshots left read what a model of the writes says,
//! the space comes back, and fsck is clean.
//!
//! The snapshots are made once (each after one 4 KiB write through the mount, requested over
//! the daemon's control socket, as fast as the disk syncs), and the pool's state and disk
//! directories are copied back before each instant. `IMGPOOL_KILL_INSTANTS` sets the number of
//! instants (default 10; the full run is 50), `IMGPOOL_KILL_SEED` their seed.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SNAPSHOTS: u64 = 10_000;
const BLOCK: u64 = 4096;
/// 256 MiB: 4,096 granules, so that later writes land in granules that earlier snapshots saw
/// and deleting them leaves versions to reclaim.
const BLOCKS: u64 = 65_536;
/// Writes before the snapshot `first`, between `s9999` and `last`, and after `last`.
const EDGE_WRITES: u64 = 64;

/// The bytes of write `n`, all different.
fn block_of(n: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(n * 1_000_003 + i as u64 + 1).to_le_bytes());
    }
    data
}

/// Where write `n` goes: scattered, and every block hit by about the same number of writes.
fn target(n: u64) -> u64 {
    (n * 40_503 + 7_919) % BLOCKS
}

/// The writes in order: `first` follows write EDGE_WRITES - 1; `s<i>` follows write
/// EDGE_WRITES + i; `last` follows the next EDGE_WRITES; the live volume has EDGE_WRITES more.
fn writes_before(snapshot: &str) -> u64 {
    match snapshot {
        "first" => EDGE_WRITES,
        "last" => 2 * EDGE_WRITES + SNAPSHOTS,
        "live" => 3 * EDGE_WRITES + SNAPSHOTS,
        s => EDGE_WRITES + s[1..].parse::<u64>().unwrap() + 1,
    }
}

/// Block -> the last of the first `writes` writes to it.
fn model(writes: u64) -> HashMap<u64, u64> {
    (0..writes).map(|n| (target(n), n)).collect()
}

/// A snapshot request over the daemon's control socket, as `imgpool snapshot create` sends it.
fn create_over_socket(socket: &Path, volume: &str, name: &str) {
    // A guid as long as a uuid: the deletion's answer lists them all (1.2 MiB for 10,000).
    let body = serde_json::json!({
        "volume": volume,
        "request": {"create": {"name": name, "guid": format!("{name:0>36}"), "created": 1}},
    })
    .to_string();
    let mut stream = UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "POST /v1/volumes/requests HTTP/1.1\r\nHost: imgpool\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "snapshot {volume}@{name}: {answer}"
    );
}

fn control_socket(state: &Path) -> PathBuf {
    let sockets: Vec<PathBuf> = std::fs::read_dir(state.join("control"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .collect();
    assert_eq!(sockets.len(), 1, "one daemon: {sockets:?}");
    sockets[0].clone()
}

/// Copies a directory tree, holes kept, over `to` (removed first).
fn copy_tree(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    let status = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "cp {from:?} {to:?}");
}

/// The volume's data file, on the pool's one disk.
fn data_file(pool: &TestPool) -> PathBuf {
    let volumes = pool.disks[0].join(".imgpool/volumes");
    let dir = std::fs::read_dir(&volumes)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    dir.path().join("data")
}

fn allocated(pool: &TestPool) -> u64 {
    std::fs::metadata(data_file(pool)).unwrap().blocks() * 512
}

/// Checks the volume file against the model after `writes` writes: a sample of the blocks that
/// some write hits (a fifth, from a random start), and of the others, which read as zeros.
fn check_content(file: &Path, writes: u64, what: &str, rng: &mut Rng) {
    let expected = model(writes);
    let file = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    let targets = (rng.below(5)..writes_before("live")).step_by(5).map(target);
    let others = (rng.below(61)..BLOCKS).step_by(61);
    for block in targets.chain(others) {
        file.read_exact_at(&mut buf, block * BLOCK).unwrap();
        let want = match expected.get(&block) {
            Some(n) => block_of(*n),
            None => vec![0u8; BLOCK as usize],
        };
        assert!(
            buf == want,
            "{what}: block {block} should hold write {:?}",
            expected.get(&block)
        );
    }
}

/// Waits until no daemon has the volume open (its last file closed, its reclaim stopped).
fn wait_closed(pool: &TestPool) {
    assert!(poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || pool.json(&["volume", "show", "v"])["open_by_pid"].is_null()
    ));
}

struct Template {
    dir: tempfile::TempDir,
    /// The data file's allocated bytes with every snapshot, and once the batch is reclaimed.
    allocated_before: u64,
    allocated_reclaimed: u64,
}

impl Template {
    fn restore(&self, pool: &TestPool) {
        copy_tree(&self.dir.path().join("state"), &pool.state);
        copy_tree(&self.dir.path().join("d1"), &pool.disks[0]);
    }
}

/// The volume with `first`, `s0`..`s9999` and `last`, and its pool copied aside.
fn make_template(pool: &TestPool) -> Template {
    pool.ok(&["volume", "create", "v", "--size", "256MiB"]);
    let mount = pool.mount_with(&["--no-bind"]);
    let socket = control_socket(&pool.state);
    let path = mount.mountpoint.join("volumes/v");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let write = |n: u64| file.write_all_at(&block_of(n), target(n) * BLOCK).unwrap();
    let started = Instant::now();
    let mut n = 0;
    for name in std::iter::once("first".to_string())
        .chain((0..SNAPSHOTS).map(|i| format!("s{i}")))
        .chain(std::iter::once("last".to_string()))
    {
        while n < writes_before(&name) {
            write(n);
            n += 1;
        }
        create_over_socket(&socket, "v", &name);
    }
    while n < writes_before("live") {
        write(n);
        n += 1;
    }
    file.sync_all().unwrap();
    drop(file);
    eprintln!(
        "{} snapshots made in {:.1} s",
        SNAPSHOTS + 2,
        started.elapsed().as_secs_f64()
    );
    wait_closed(pool);
    mount.unmount();
    let dir = tempfile::Builder::new()
        .prefix("imgpool-kills.")
        .tempdir()
        .unwrap();
    copy_tree(&pool.state, &dir.path().join("state"));
    copy_tree(&pool.disks[0], &dir.path().join("d1"));
    let allocated_before = allocated(pool);
    // The reference: the batch deleted and reclaimed, uninterrupted.
    pool.ok(&["snapshot", "rm", "v@s0%s9999"]);
    let allocated_reclaimed = allocated(pool);
    assert!(
        allocated_reclaimed < allocated_before * 9 / 10,
        "the batch frees little: {allocated_before} -> {allocated_reclaimed} bytes"
    );
    Template {
        dir,
        allocated_before,
        allocated_reclaimed,
    }
}

#[derive(Debug, Clone, Copy)]
enum Killed {
    /// The mount daemon, which does the deletion for the volume it has open and reclaims in
    /// the background.
    Daemon,
    /// The command, which does it all itself on a pool that is not mounted.
    Command,
}

/// Starts the batch deletion; with `Daemon`, the volume is held open through `mount`.
fn start_batch(pool: &TestPool) -> ChildGuard {
    ChildGuard(Some(
        pool.command(&["snapshot", "rm", "v@s0%s9999"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// How long the deletion and its reclaim take, uninterrupted, in each way.
fn duration_of(pool: &TestPool, template: &Template, killed: Killed) -> Duration {
    template.restore(pool);
    let mount = matches!(killed, Killed::Daemon).then(|| pool.mount_with(&["--no-bind"]));
    let held = mount
        .as_ref()
        .map(|m| std::fs::File::open(m.mountpoint.join("volumes/v")).unwrap());
    let started = Instant::now();
    let mut batch = start_batch(pool);
    assert!(batch
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .success());
    assert!(poll(
        Duration::from_secs(60),
        Duration::from_millis(5),
        || { allocated(pool) <= template.allocated_reclaimed }
    ));
    let took = started.elapsed();
    drop(held);
    if let Some(mount) = mount {
        wait_closed(pool);
        mount.unmount();
    }
    took
}

/// One instant: the batch killed `delay` after it started, then everything checked.
fn kill_at(
    pool: &TestPool,
    template: &Template,
    killed: Killed,
    delay: Duration,
    rng: &mut Rng,
) -> &'static str {
    template.restore(pool);
    let what = format!("{killed:?} killed after {} ms", delay.as_millis());
    let batch_succeeded = match killed {
        Killed::Daemon => {
            let mount = pool.mount_with(&["--no-bind"]);
            let held = std::fs::File::open(mount.mountpoint.join("volumes/v")).unwrap();
            let mut batch = start_batch(pool);
            std::thread::sleep(delay);
            kill9(mount.pid.unwrap());
            let status = batch.wait_timeout(Duration::from_secs(60)).unwrap();
            drop(held);
            drop(mount); // lazily unmounts what the dead daemon left
            status.success()
        }
        Killed::Command => {
            let mut batch = start_batch(pool);
            std::thread::sleep(delay);
            kill9(batch.pid());
            batch
                .wait_timeout(Duration::from_secs(60))
                .unwrap()
                .success()
        }
    };

    // Restarted: the batch is listed whole or not at all.
    let mount = pool.mount_with(&["--no-bind"]);
    let names = pool.snapshot_names("v");
    let batch_left = names.iter().filter(|n| n.starts_with('s')).count() as u64;
    assert!(
        batch_left == 0 || (batch_left == SNAPSHOTS && !batch_succeeded),
        "{what}: {batch_left} of the batch listed (the command succeeded: {batch_succeeded})"
    );
    assert!(
        names.contains(&"first".to_string()) && names.contains(&"last".to_string()),
        "{what}: {names:?}"
    );

    // The volume reads right; open, its daemon resumes the reclaim, and the space comes back.
    let path = mount.mountpoint.join("volumes/v");
    let held = std::fs::File::open(&path).unwrap();
    let reopened = Instant::now();
    check_content(
        &path,
        writes_before("live"),
        &format!("{what}: the volume"),
        rng,
    );
    let expected = if batch_left == 0 {
        template.allocated_reclaimed
    } else {
        template.allocated_before
    };
    assert!(
        poll(Duration::from_secs(60), Duration::from_millis(20), || {
            allocated(pool) <= expected
        }),
        "{what}: {} bytes allocated, not back to {expected}",
        allocated(pool)
    );
    eprintln!(
        "  {what}: read and reclaimed {:.1} s after the volume was opened again",
        reopened.elapsed().as_secs_f64()
    );
    drop(held);
    wait_closed(pool);
    mount.unmount();
    let fsck = pool.run(&["fsck"]);
    assert!(
        fsck.status.success(),
        "{what}: fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // The snapshots left read right: each rolled back to, newest first.
    let mut samples = vec!["last".to_string()];
    if batch_left > 0 {
        let high = SNAPSHOTS / 2 + rng.below(SNAPSHOTS / 2);
        samples.push(format!("s{high}"));
        samples.push(format!("s{}", rng.below(high)));
    }
    samples.push("first".to_string());
    let mount = pool.mount_with(&["--no-bind"]);
    for name in &samples {
        pool.ok(&[
            "volume",
            "rollback",
            &format!("v@{name}"),
            "--destroy-newer",
        ]);
        check_content(
            &path,
            writes_before(name),
            &format!("{what}: snapshot {name}"),
            rng,
        );
        wait_closed(pool);
    }
    mount.unmount();
    if batch_left == 0 {
        "applied"
    } else {
        "not applied"
    }
}

#[test]
fn a_batch_delete_killed_at_any_instant_is_all_or_nothing_and_reclaims_in_the_end() {
    if !can_mount("a_batch_delete_killed_at_any_instant_is_all_or_nothing_and_reclaims_in_the_end")
    {
        return;
    }
    let instants: u64 = std::env::var("IMGPOOL_KILL_INSTANTS")
        .map(|v| v.parse().expect("IMGPOOL_KILL_INSTANTS is a number"))
        .unwrap_or(10);
    let seed: u64 = std::env::var("IMGPOOL_KILL_SEED")
        .map(|v| v.parse().expect("IMGPOOL_KILL_SEED is a number"))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("IMGPOOL_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let pool = TestPool::new(1);
    let template = make_template(&pool);
    // Half the instants fall anywhere in the deletion and its reclaim (and a little past them),
    // half in its first 200 ms, where the command starts and the transaction commits.
    let spans = [
        (
            Killed::Daemon,
            duration_of(&pool, &template, Killed::Daemon),
        ),
        (
            Killed::Command,
            duration_of(&pool, &template, Killed::Command),
        ),
    ];
    eprintln!("uninterrupted: {spans:?}");
    let mut outcomes: HashMap<&str, u64> = HashMap::new();
    for i in 0..instants {
        let (killed, span) = spans[(i % 2) as usize];
        let delay = if rng.below(2) == 0 {
            span.mul_f64(rng.below(1200) as f64 / 1000.0)
        } else {
            Duration::from_millis(rng.below(200))
        };
        let started = Instant::now();
        let outcome = kill_at(&pool, &template, killed, delay, &mut rng);
        eprintln!(
            "instant {i}: {killed:?} killed after {delay:?}: batch {outcome}, checked in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
}
