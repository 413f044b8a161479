//! `imgpool copy` across a real ssh connection: the test's own sshd on 127.0.0.1
//! (`common::sshd`), a second pool (its own state dir and disks) standing for the other node,
//! reached as `localhost:VOLUME` with the test's binary as the remote imgpool. Both pools are
//! mounted and every snapshot and the live volume are compared byte for byte through the
//! mounts' files (never through `send`). The connection is cut at random instants of copies
//! and refreshes; after the next start on both sides (which cleans up what a dead command
//! left), the target must be at its last good state or a later whole one, and no temporary
//! snapshot may be left.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::sshd::{children_of, Sshd};
use common::*;

const MIB: usize = 1 << 20;
const SIZE: usize = 32 * MIB;
/// Rewrites go in pieces of this size at distinct places.
const PIECE: usize = 64 * 1024;

/// Two nodes: `here` (mounted), `there` (mounted, reached through `sshd`). Fields drop in
/// order: mounts before the pools' directories go.
struct Nodes {
    mount_here: MountGuard,
    mount_there: MountGuard,
    sshd: Sshd,
    there: TestPool,
    here: TestPool,
    /// The source volume's content now.
    model: Vec<u8>,
    /// The PIECE slots rewritten so far: rewrites go to fresh ones while there are, so that
    /// the bytes changed add up.
    used: Vec<bool>,
    rng: Rng,
}

/// A volume as the mount shows it: its snapshots (name, guid, bytes) and its live bytes.
#[derive(PartialEq)]
struct State {
    snapshots: Vec<(String, String, Vec<u8>)>,
    live: Vec<u8>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.snapshots.iter().map(|s| s.0.as_str()).collect();
        write!(f, "State {{ snapshots: {names:?}, .. }}")
    }
}

fn exists(pool: &TestPool, volume: &str) -> bool {
    pool.json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == volume)
}

fn state(pool: &TestPool, mount: &MountGuard, volume: &str) -> Option<State> {
    if !exists(pool, volume) {
        return None;
    }
    let snapshots = snapshot_list(pool, volume)
        .into_iter()
        .map(|(name, guid)| {
            let bytes = read_mounted(&mount.mountpoint.join("snapshots").join(volume).join(&name));
            (name, guid, bytes)
        })
        .collect();
    let live = read_mounted(&mount.mountpoint.join("volumes").join(volume));
    wait_closed(pool, volume);
    Some(State { snapshots, live })
}

/// The processes whose command line names `path` (a pool's state dir): the commands still
/// working on that pool, here or behind the ssh connection, and its mount daemon.
fn processes_naming(path: &Path) -> Vec<i32> {
    let needle = path.to_str().unwrap().as_bytes();
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .filter(|&pid| process_alive(pid))
        .collect()
}

impl Nodes {
    fn new() -> Nodes {
        let here = TestPool::new(1);
        let there = TestPool::new(1);
        here.ok(&["volume", "create", "v", "--size", &SIZE.to_string()]);
        let mount_here = here.mount();
        let mount_there = there.mount();
        let sshd = Sshd::start();
        let nodes = Nodes {
            mount_here,
            mount_there,
            sshd,
            there,
            here,
            model: vec![0u8; SIZE],
            used: vec![false; SIZE / PIECE],
            rng: Rng(0xc0b1),
        };
        read_mounted(&nodes.mount_here.mountpoint.join("volumes/v"));
        wait_closed(&nodes.here, "v");
        nodes
    }

    /// `imgpool copy ARGS` run here, the other node reached through the test's sshd.
    fn copy_command(&self, args: &[&str]) -> Command {
        let mut all = vec!["copy"];
        all.extend_from_slice(args);
        let rsh = self.sshd.rsh();
        all.extend([
            "--rsh",
            &rsh,
            "--remote-state-dir",
            self.there.state.to_str().unwrap(),
            "--remote-imgpool",
            BIN,
        ]);
        let mut command = self.here.command(&all);
        // The shared connections' sockets go in this test's own directory.
        command.env("TMPDIR", self.tmp());
        command
    }

    fn tmp(&self) -> std::path::PathBuf {
        let tmp = self.here.path("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        tmp
    }

    fn copy(&self, args: &[&str]) -> Output {
        self.copy_command(args).output().unwrap()
    }

    fn copy_ok(&self, args: &[&str]) -> String {
        let out = self.copy(args);
        assert!(
            out.status.success(),
            "copy {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Writes `pieces` pieces of PIECE random bytes at distinct places of the source, through
    /// its mount; returns the bytes written.
    fn rewrite(&mut self, pieces: usize) -> usize {
        let path = self.mount_here.mountpoint.join("volumes/v");
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let mut slots: Vec<usize> = Vec::new();
        let fresh_left = self.used.iter().filter(|u| !**u).count() >= pieces;
        while slots.len() < pieces {
            let slot = self.rng.below((SIZE / PIECE) as u64) as usize;
            let taken = slots.contains(&slot) || (fresh_left && self.used[slot]);
            if !taken {
                slots.push(slot);
                self.used[slot] = true;
            }
        }
        for slot in slots {
            let seed = self.rng.next();
            let data: Vec<u8> = (0..PIECE)
                .map(|i| (seed.wrapping_mul(i as u64 + 1) >> 24) as u8)
                .collect();
            file.write_all_at(&data, (slot * PIECE) as u64).unwrap();
            self.model[slot * PIECE..(slot + 1) * PIECE].copy_from_slice(&data);
        }
        file.sync_all().unwrap();
        drop(file);
        wait_closed(&self.here, "v");
        pieces * PIECE
    }

    fn snapshot(&self, pool: &TestPool, target: &str) {
        pool.ok(&["snapshot", "create", target]);
    }

    fn source(&self) -> State {
        let state = state(&self.here, &self.mount_here, "v").unwrap();
        assert!(
            state.live == self.model,
            "the source differs from its model"
        );
        state
    }

    fn target(&self) -> Option<State> {
        state(&self.there, &self.mount_there, "v")
    }

    /// The target equals the source: the same snapshots (names and guids), each and the live
    /// volume byte-equal.
    fn assert_equal(&self, what: &str) {
        let source = self.source();
        let target = self.target().unwrap_or_else(|| panic!("{what}: no target"));
        assert_eq!(target, source, "{what}: the snapshots differ");
        for ((name, _, a), (_, _, b)) in source.snapshots.iter().zip(&target.snapshots) {
            assert!(a == b, "{what}: snapshot {name} differs");
        }
        assert!(
            target.live == source.live,
            "{what}: the live volume differs"
        );
    }

    /// Waits until no command works on either pool any more (after a cut, the far side's
    /// commands notice it on their own time).
    fn settle(&self) {
        let daemons = [self.mount_here.pid, self.mount_there.pid];
        let commands = |pool: &TestPool| -> Vec<i32> {
            processes_naming(&pool.state)
                .into_iter()
                .filter(|pid| !daemons.contains(&Some(*pid)))
                .collect()
        };
        for pool in [&self.here, &self.there] {
            assert!(
                wait_until(Duration::from_secs(30), || commands(pool).is_empty()),
                "commands on {} still run: {:?}",
                pool.state.display(),
                commands(pool)
            );
        }
    }

    /// A start on both sides (a pool-changing command runs recovery first), then no
    /// temporary snapshot left on either.
    fn assert_no_temporary_snapshots_after_a_start(&self, what: &str) {
        for (pool, name) in [(&self.here, "here"), (&self.there, "there")] {
            pool.ok(&["repair"]);
            if !exists(pool, "v") {
                continue;
            }
            let left: Vec<String> = snapshot_list(pool, "v")
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| n.contains("-tmp-"))
                .collect();
            assert!(left.is_empty(), "{what}: {name} keeps {left:?}");
        }
    }
}

fn summary(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("copy --json: {e}: {stdout}"))
}

#[test]
fn copies_and_refreshes_over_ssh_are_equal_on_both_sides_and_send_what_changed() {
    let test = "copies_and_refreshes_over_ssh_are_equal_on_both_sides_and_send_what_changed";
    if !can_mount(test) {
        return;
    }
    let mut nodes = Nodes::new();
    nodes.rewrite(64);
    nodes.snapshot(&nodes.here, "v@s1");
    nodes.rewrite(64);
    nodes.snapshot(&nodes.here, "v@s2");
    let live_at_copy = nodes.rewrite(16);

    // A dry run plans and changes nothing.
    let planned = nodes.copy_ok(&["v", "localhost:v", "--dry-run"]);
    assert!(planned.contains("a full copy"), "{planned}");
    assert!(nodes.target().is_none(), "a dry run created the target");

    let full = summary(&nodes.copy_ok(&["v", "localhost:v", "--json"]));
    assert_eq!(full["kind"], "full", "{full}");
    assert_eq!(full["snapshots"], serde_json::json!(["s1", "s2"]), "{full}");
    assert!(
        full["temporary_snapshot"]
            .as_str()
            .is_some_and(|t| t.starts_with("copy-tmp-")),
        "the live state went through send's temporary snapshot: {full}"
    );
    assert!(
        full["bytes"].as_u64().unwrap() >= (144 * PIECE) as u64,
        "{full}"
    );
    nodes.assert_equal("after the full copy");
    nodes.assert_no_temporary_snapshots_after_a_start("after the full copy");

    // An existing target is refreshed only when asked.
    let before = nodes.target();
    let line = failed_cleanly(
        "copy onto an existing target",
        &nodes.copy(&["v", "localhost:v"]),
    );
    assert!(line.contains("--refresh"), "{line}");
    assert_eq!(nodes.target(), before);

    // Rewrites on the source, a snapshot, more rewrites: the refresh carries about them, and
    // what was written after s2 before the full copy (whose live state the refresh discards
    // on the target, rolled back to s2).
    let mut changed = live_at_copy + nodes.rewrite(16);
    nodes.snapshot(&nodes.here, "v@s3");
    changed += nodes.rewrite(8);
    let refresh = summary(&nodes.copy_ok(&["v", "localhost:v", "--refresh", "--json"]));
    assert_eq!(refresh["kind"], "incremental", "{refresh}");
    assert_eq!(refresh["common"], "s2", "{refresh}");
    let crossed = refresh["bytes"].as_u64().unwrap() as usize;
    assert!(
        crossed >= changed && crossed <= changed * 11 / 10 + 256 * 1024,
        "{crossed} bytes crossed for {changed} changed"
    );
    nodes.assert_equal("after the refresh");

    // The target diverges: a write and a snapshot of its own.
    {
        let path = nodes.mount_there.mountpoint.join("volumes/v");
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[7u8; 4096], 0).unwrap();
        file.sync_all().unwrap();
    }
    wait_closed(&nodes.there, "v");
    nodes.snapshot(&nodes.there, "v@mine");
    let diverged = nodes.target();
    let plan = nodes.copy_ok(&["v", "localhost:v", "--refresh", "--dry-run"]);
    assert!(plan.contains("would delete localhost:v@mine"), "{plan}");
    assert_eq!(nodes.target(), diverged, "a dry run changed the target");
    assert!(nodes.target().unwrap().live == diverged.as_ref().unwrap().live);
    nodes.rewrite(4);
    nodes.snapshot(&nodes.here, "v@s4");
    let done = nodes.copy_ok(&["v", "localhost:v", "--refresh"]);
    assert!(done.contains("will delete localhost:v@mine"), "{done}");
    assert!(done.contains("deleted localhost:v@mine\n"), "{done}");
    nodes.assert_equal("after the refresh over the target's own snapshot");

    // And back: the far side's volume pulled into a new one here.
    nodes.copy_ok(&["localhost:v", "back", "--json"]);
    let back = state(&nodes.here, &nodes.mount_here, "back").unwrap();
    assert_eq!(back, nodes.source(), "pulled back");
    assert!(back.live == nodes.model);
    // And from the far side to the far side: one connection shared by both ends.
    nodes.copy_ok(&["localhost:v", "localhost:again"]);
    let again = state(&nodes.there, &nodes.mount_there, "again").unwrap();
    assert_eq!(again, nodes.source(), "copied over there");
    nodes.assert_no_temporary_snapshots_after_a_start("at the end");
    // No control socket of the shared connections is left.
    let sockets: Vec<_> = std::fs::read_dir(nodes.tmp()).unwrap().flatten().collect();
    assert!(sockets.is_empty(), "{sockets:?}");
}

/// What stops a copy midway.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// sshd's connection processes killed: the network goes.
    Connection,
    /// The copy's ssh client killed.
    SshClient,
    /// The copy's local imgpool child (the send of a push) killed: what a crash of this node
    /// leaves, its temporary snapshot included.
    LocalEnd,
}

impl Cut {
    fn of_round(round: u64) -> Cut {
        [Cut::Connection, Cut::SshClient, Cut::LocalEnd][round as usize % 3]
    }
}

/// Starts a copy and stops it after `delay` by `cut`; returns the copy's output and how long
/// it ran.
fn cut_copy(nodes: &Nodes, args: &[&str], delay: Duration, cut: Cut) -> (Output, Duration) {
    let mut child = ChildGuard(Some(
        nodes
            .copy_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let named = |pid: i32, name: &str| -> Vec<i32> {
        children_of(pid)
            .into_iter()
            .filter(|c| {
                std::fs::read_to_string(format!("/proc/{c}/comm"))
                    .is_ok_and(|comm| comm.trim().starts_with(name))
            })
            .collect()
    };
    // The instant, then as soon as what is cut exists (a connection, an ssh client, a local
    // end: the copy has none of them for a moment between its steps).
    let start = Instant::now();
    loop {
        if child.0.as_mut().unwrap().try_wait().unwrap().is_some() {
            break;
        }
        let present = match cut {
            Cut::Connection => !named(nodes.sshd.pid(), "sshd").is_empty(),
            Cut::SshClient => !named(child.pid(), "ssh").is_empty(),
            Cut::LocalEnd => !named(child.pid(), "imgpool").is_empty(),
        };
        if start.elapsed() >= delay && present {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let kill_child = |name: &str| {
        for pid in named(child.pid(), name) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    };
    match cut {
        Cut::Connection => {
            nodes.sshd.cut();
        }
        Cut::SshClient => kill_child("ssh"),
        Cut::LocalEnd => kill_child("imgpool"),
    }
    let out = child.0.take().unwrap().wait_with_output().unwrap();
    let took = start.elapsed();
    if !out.status.success() {
        let line = failed_cleanly(&format!("a copy cut by {cut:?}"), &out);
        if !matches!(cut, Cut::LocalEnd) {
            assert!(
                line.contains("localhost"),
                "the failure names the host: {line}"
            );
        }
    }
    (out, took)
}

/// Cuts per kind of copy.
const ROUNDS: u64 = 4;

/// The instant of cut `round` within `span` ms: one in each quarter of it, at a random place
/// there, so that the cuts fall early, midway and late in every run.
fn spread(round: u64, span: u64, rng: &mut Rng) -> Duration {
    let quarter = span / ROUNDS + 1;
    Duration::from_millis(round * quarter + rng.below(quarter))
}

/// Every snapshot of the target is whole: byte-equal to the source's snapshot of its guid.
fn assert_snapshots_whole(source: &State, target: &State, what: &str) {
    for (name, guid, bytes) in &target.snapshots {
        let of_source = source
            .snapshots
            .iter()
            .find(|s| &s.1 == guid)
            .unwrap_or_else(|| panic!("{what}: target snapshot {name} is not the source's"));
        assert!(
            &of_source.2 == bytes,
            "{what}: snapshot {name} is half-applied"
        );
    }
}

#[test]
fn copies_and_refreshes_cut_at_random_instants_keep_the_targets_last_good_state() {
    let test = "copies_and_refreshes_cut_at_random_instants_keep_the_targets_last_good_state";
    if !can_mount(test) {
        return;
    }
    let mut nodes = Nodes::new();
    nodes.rewrite(128);
    nodes.snapshot(&nodes.here, "v@s1");
    nodes.rewrite(128);
    nodes.snapshot(&nodes.here, "v@s2");
    nodes.rewrite(32);

    // How long a whole copy takes here: the cuts fall within it.
    let started = Instant::now();
    nodes.copy_ok(&["v", "localhost:probe"]);
    let mut span = started.elapsed().as_millis() as u64 + 1;
    nodes.there.ok(&["volume", "rm", "--recursive", "probe"]);

    let mut rng = Rng(0x5eed_c075);
    let mut cut_short = 0;
    for round in 0..ROUNDS {
        let what = format!("full copy, cut {round}");
        let source = nodes.source();
        let delay = spread(round, span, &mut rng);
        let (out, took) = cut_copy(&nodes, &["v", "localhost:v"], delay, Cut::of_round(round));
        if out.status.success() {
            // It ran faster than the first (the machine is shared): the next cuts come sooner.
            span = span.min(took.as_millis() as u64 + 1);
        }
        cut_short += usize::from(!out.status.success());
        nodes.settle();
        // The next start on both sides: what a dead command left is cleaned up (no
        // temporary snapshot stays), and the target is whole or absent.
        nodes.assert_no_temporary_snapshots_after_a_start(&what);
        eprintln!(
            "{what} after {delay:?} of {span} ms: {}, target {:?}",
            out.status,
            nodes.target()
        );
        match nodes.target() {
            None => {}
            Some(target) => {
                // The snapshots arrive as one package: all of them, whole.
                assert_eq!(target.snapshots.len(), source.snapshots.len(), "{what}");
                assert_snapshots_whole(&source, &target, &what);
                let newest = &source.snapshots.last().unwrap().2;
                assert!(
                    target.live == *newest || target.live == source.live,
                    "{what}: the live volume is neither the newest snapshot nor the source's"
                );
            }
        }
        if nodes.target().is_some() {
            nodes.copy_ok(&["v", "localhost:v", "--refresh"]);
            nodes.assert_equal(&what);
            nodes.there.ok(&["volume", "rm", "--recursive", "v"]);
        }
    }

    // The cuts fell inside copies, not only after them (the seed is fixed).
    assert!(cut_short > 0, "no cut stopped a copy");

    nodes.copy_ok(&["v", "localhost:v"]);
    // How long a refresh of such changes takes.
    nodes.rewrite(64);
    nodes.snapshot(&nodes.here, "v@probe");
    nodes.rewrite(16);
    let started = Instant::now();
    nodes.copy_ok(&["v", "localhost:v", "--refresh"]);
    let mut refresh_span = started.elapsed().as_millis() as u64 + 1;
    let mut refreshes_cut_short = 0;
    for round in 0..ROUNDS {
        let what = format!("refresh, cut {round}");
        nodes.rewrite(64);
        nodes.snapshot(&nodes.here, &format!("v@r{round}"));
        nodes.rewrite(16);
        let before = nodes.target().unwrap();
        let source = nodes.source();
        let delay = spread(round, refresh_span, &mut rng);
        let (out, took) = cut_copy(
            &nodes,
            &["v", "localhost:v", "--refresh"],
            delay,
            Cut::of_round(round + 1),
        );
        refreshes_cut_short += usize::from(!out.status.success());
        if out.status.success() {
            refresh_span = refresh_span.min(took.as_millis() as u64 + 1);
        }
        nodes.settle();
        // Already before any start, the mount serves no half-written volume.
        let served = nodes.target().expect("the target stays").live;
        let at_snapshot = |live: &Vec<u8>| source.snapshots.iter().any(|s| &s.2 == live);
        assert!(
            served == before.live || served == source.live || at_snapshot(&served),
            "{what}: before any start, the mount serves a volume that is no state it had or was sent"
        );
        nodes.assert_no_temporary_snapshots_after_a_start(&what);
        eprintln!(
            "{what} after {delay:?} of {refresh_span} ms: {}, {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let after = nodes
            .target()
            .unwrap_or_else(|| panic!("{what}: the target was lost"));
        // What it had stays (nothing newer than the common snapshot to discard here), and
        // what it got is whole.
        assert_eq!(
            after.snapshots[..before.snapshots.len()],
            before.snapshots[..],
            "{what}"
        );
        assert!(
            after.snapshots.len() <= before.snapshots.len() + 1,
            "{what}"
        );
        assert_snapshots_whole(&source, &after, &what);
        let allowed = [
            &before.live,
            &before.snapshots.last().unwrap().2,
            &after.snapshots.last().unwrap().2,
            &source.live,
        ];
        let differing = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert!(
            allowed.contains(&&after.live),
            "{what}: the live volume is not a state the target had or was sent (bytes differing from each: {:?}; the target: {after:?}, listed {:?}; the copy said: {})",
            allowed.iter().map(|a| differing(a, &after.live)).collect::<Vec<_>>(),
            snapshot_list(&nodes.there, "v"),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        nodes.copy_ok(&["v", "localhost:v", "--refresh"]);
        nodes.assert_equal(&what);
    }
    assert!(refreshes_cut_short > 0, "no cut stopped a refresh");

    // A crash of this node while its send of the live state holds its temporary snapshot:
    // the link held still (ssh stopped) so that the send blocks mid-stream, then the send
    // killed. The snapshot stays behind until the next start (or the mount daemon's next
    // recovery, which may come first: the pool changed).
    nodes.rewrite(256);
    let mut copy = ChildGuard(Some(
        nodes
            .copy_command(&["v", "localhost:v", "--refresh"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    // The child `name` whose command line holds `arg`.
    let child_named = |name: &str, arg: &str| {
        children_of(copy.pid()).into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(arg.len()).any(|w| w == arg.as_bytes()))
        })
    };
    let signal = |pid: i32, signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    };
    let mut link = None;
    assert!(wait_until(Duration::from_secs(30), || {
        link = child_named("ssh", " recv ");
        link.is_some()
    }));
    signal(link.unwrap(), nix::sys::signal::Signal::SIGSTOP);
    let sender = child_named("imgpool", "send").expect("the send runs beside its link");
    assert!(
        wait_until(Duration::from_secs(30), || snapshot_list(&nodes.here, "v")
            .iter()
            .any(|(name, _)| name.starts_with("copy-tmp-"))),
        "the send took no temporary snapshot"
    );
    signal(sender, nix::sys::signal::Signal::SIGKILL);
    signal(link.unwrap(), nix::sys::signal::Signal::SIGCONT);
    let status = copy
        .wait_timeout(Duration::from_secs(30))
        .expect("copy ends");
    assert_eq!(status.code(), Some(1));
    nodes.settle();
    nodes.assert_no_temporary_snapshots_after_a_start("after a killed send of the live state");
    nodes.copy_ok(&["v", "localhost:v", "--refresh"]);
    nodes.assert_equal("after a killed send of the live state");
}

/// Makes the target anew as a volume of its own: smaller than the source, with snapshots of
/// its own (one named like a source snapshot, under another guid) and writes since.
fn foreign_target(nodes: &Nodes, seed: u8) -> State {
    if exists(&nodes.there, "v") {
        nodes.there.ok(&["volume", "rm", "--recursive", "v"]);
    }
    let size = SIZE / 2;
    nodes
        .there
        .ok(&["volume", "create", "v", "--size", &size.to_string()]);
    let path = nodes.mount_there.mountpoint.join("volumes/v");
    read_mounted(&path);
    let write = |at: usize, byte: u8| {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&vec![byte; PIECE], at as u64).unwrap();
        file.sync_all().unwrap();
        drop(file);
        wait_closed(&nodes.there, "v");
    };
    write(0, seed);
    nodes.snapshot(&nodes.there, "v@s1");
    write(size / 2, seed.wrapping_add(1));
    nodes.snapshot(&nodes.there, "v@theirs");
    write(size - PIECE, seed.wrapping_add(2));
    nodes.target().unwrap()
}

/// The volumes listed on the target's side, and the volume directories on its disk: one each,
/// once nothing is under way.
fn volumes_and_dirs(pool: &TestPool) -> (usize, usize) {
    let listed = pool.json(&["volume", "list"]).as_array().unwrap().len();
    let dirs = std::fs::read_dir(pool.disks[0].join(".imgpool/volumes"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    (listed, dirs)
}

#[test]
fn a_refresh_onto_a_target_that_shares_nothing_replaces_it_and_a_cut_never_loses_it() {
    let test = "a_refresh_onto_a_target_that_shares_nothing_replaces_it_and_a_cut_never_loses_it";
    if !can_mount(test) {
        return;
    }
    let mut nodes = Nodes::new();
    nodes.rewrite(64);
    nodes.snapshot(&nodes.here, "v@s1");
    nodes.rewrite(64);
    nodes.snapshot(&nodes.here, "v@s2");
    nodes.rewrite(16);

    // The plan names the replacement and every target snapshot that goes; a dry run changes
    // nothing.
    let old = foreign_target(&nodes, 1);
    let plan = nodes.copy_ok(&["v", "localhost:v", "--refresh", "--dry-run"]);
    assert!(plan.contains("shares no snapshot"), "{plan}");
    for name in ["s1", "theirs"] {
        assert!(
            plan.contains(&format!(
                "would delete localhost:v@{name}: the target is replaced"
            )),
            "{plan}"
        );
    }
    let planned =
        summary(&nodes.copy_ok(&["v", "localhost:v", "--refresh", "--dry-run", "--json"]));
    assert_eq!(planned["kind"], "replace", "{planned}");
    assert_eq!(
        planned["discarded"],
        serde_json::json!(["s1", "theirs"]),
        "{planned}"
    );
    assert_eq!(nodes.target(), Some(old), "a dry run changed the target");

    // How long a whole copy takes here: the cuts fall within it.
    let started = Instant::now();
    nodes.copy_ok(&["v", "localhost:probe"]);
    let mut span = started.elapsed().as_millis() as u64 + 1;
    nodes.there.ok(&["volume", "rm", "--recursive", "probe"]);
    let mut rng = Rng(0x7e91_ace5);
    let (mut kept, mut replaced) = (0, 0);
    for round in 0..ROUNDS {
        let what = format!("replacing refresh, cut {round}");
        let old = foreign_target(&nodes, round as u8 + 2);
        let source = nodes.source();
        let delay = spread(round, span, &mut rng);
        let (out, took) = cut_copy(
            &nodes,
            &["v", "localhost:v", "--refresh"],
            delay,
            Cut::of_round(round),
        );
        if out.status.success() {
            span = span.min(took.as_millis() as u64 + 1);
        }
        nodes.settle();
        nodes.assert_no_temporary_snapshots_after_a_start(&what);
        let after = nodes
            .target()
            .unwrap_or_else(|| panic!("{what}: the target was lost"));
        eprintln!(
            "{what} after {delay:?} of {span} ms: {}, target {after:?}",
            out.status
        );
        if after == old {
            assert!(!out.status.success(), "{what}: the copy did not replace");
            kept += 1;
        } else {
            // Replaced, by the source's snapshots all whole (one package), at the newest or
            // at the source's live state.
            assert_eq!(after.snapshots.len(), source.snapshots.len(), "{what}");
            assert_snapshots_whole(&source, &after, &what);
            let newest = &source.snapshots.last().unwrap().2;
            assert!(
                after.live == *newest || after.live == source.live,
                "{what}: the live volume is neither the newest snapshot nor the source's"
            );
            replaced += 1;
        }
        assert_eq!(
            volumes_and_dirs(&nodes.there),
            (1, 1),
            "{what}: a half replacement is left"
        );
        nodes.there.ok(&["fsck"]);
    }
    eprintln!("cut replacing refreshes: {kept} kept the old target, {replaced} replaced it");
    assert!(kept > 0, "no cut stopped a replacement");

    // Uncut: each target snapshot that goes is listed first, then as deleted.
    foreign_target(&nodes, 9);
    let done = nodes.copy_ok(&["v", "localhost:v", "--refresh"]);
    for name in ["s1", "theirs"] {
        assert!(
            done.contains(&format!("will delete localhost:v@{name}")),
            "{done}"
        );
        assert!(
            done.contains(&format!("deleted localhost:v@{name}\n")),
            "{done}"
        );
    }
    nodes.assert_equal("after the replacement");
    nodes.assert_no_temporary_snapshots_after_a_start("after the replacement");
    assert_eq!(volumes_and_dirs(&nodes.there), (1, 1));
    // From there on, refreshes are incremental.
    nodes.rewrite(8);
    nodes.snapshot(&nodes.here, "v@s3");
    let next = summary(&nodes.copy_ok(&["v", "localhost:v", "--refresh", "--json"]));
    assert_eq!(next["kind"], "incremental", "{next}");
    nodes.assert_equal("after the next refresh");
}

#[test]
fn unreachable_hosts_existing_targets_and_bad_names_fail_with_one_line_and_change_nothing() {
    let test =
        "unreachable_hosts_existing_targets_and_bad_names_fail_with_one_line_and_change_nothing";
    if !can_mount(test) {
        return;
    }
    let mut nodes = Nodes::new();
    nodes.rewrite(8);
    nodes.snapshot(&nodes.here, "v@s1");

    // A port nobody listens on: ssh exits 255; its last line is in the message.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rsh = format!("ssh -p {closed} -o BatchMode=yes -o ConnectTimeout=5");
    let out = nodes.here.run(&["copy", "v", "localhost:v", "--rsh", &rsh]);
    let line = failed_cleanly("copy to an unreachable host", &out);
    assert!(line.contains("cannot reach localhost"), "{line}");
    assert!(line.contains("Connection refused"), "{line}");
    assert!(nodes.target().is_none());
    let source = nodes.source();

    // A target there that shares nothing with the source, without --refresh (with it, it is
    // replaced: `a_refresh_onto_a_target_that_shares_nothing_replaces_it_and_a_cut_never_loses_it`).
    nodes
        .there
        .ok(&["volume", "create", "v", "--size", &SIZE.to_string()]);
    nodes.snapshot(&nodes.there, "v@other");
    let before = nodes.target();
    let line = failed_cleanly("copy onto a target", &nodes.copy(&["v", "localhost:v"]));
    assert!(
        line.contains("localhost:v") && line.contains("--refresh"),
        "{line}"
    );
    assert_eq!(
        nodes.target(),
        before,
        "the refused copy changed the target"
    );

    // Bad names, on either side.
    for (args, expected) in [
        (&["nosuch", "localhost:w"][..], "nosuch"),
        (&["v@s1", "localhost:w"][..], "names a snapshot"),
        (&["v", ":w"][..], "no host"),
        (&["v", "v"][..], "same volume"),
        // A name kept for the volumes a receive makes out of sight: refused before any
        // package, not by the far side's `recv`.
        (&["v", "localhost:recv-tmp-w"][..], "pick another name"),
    ] {
        let line = failed_cleanly(&format!("copy {args:?}"), &nodes.copy(args));
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    let line = failed_cleanly(
        "a missing remote imgpool",
        &nodes.here.run(&[
            "copy",
            "v",
            "localhost:w",
            "--rsh",
            &nodes.sshd.rsh(),
            "--remote-imgpool",
            "/nonexistent/imgpool",
        ]),
    );
    assert!(line.contains("--remote-imgpool"), "{line}");
    assert!(!exists(&nodes.there, "w"));
    assert!(!exists(&nodes.there, "recv-tmp-w"));
    assert_eq!(nodes.source(), source);

    // A snapshot taken on the target between the copy's look at it and the refresh: the far
    // side's imgpool is a wrapper that takes it right after the first listing. Nothing the
    // plan did not list is discarded: the refresh stops before anything changed.
    nodes.there.ok(&["volume", "rm", "--recursive", "v"]);
    nodes.copy_ok(&["v", "localhost:v"]);
    nodes.rewrite(8);
    nodes.snapshot(&nodes.here, "v@s2");
    let wrapper = nodes.here.path("imgpool-snapshotting");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\"{BIN}\" \"$@\"; rc=$?\n\
             case \"$*\" in *'snapshot list v'*) [ -e {mark} ] || {{ touch {mark}; \"{BIN}\" \"$1\" \"$2\" snapshot create v@sneaky >/dev/null; }};; esac\n\
             exit $rc\n",
            mark = nodes.here.path("listed").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = nodes.here.run(&[
        "copy",
        "v",
        "localhost:v",
        "--refresh",
        "--rsh",
        &nodes.sshd.rsh(),
        "--remote-state-dir",
        nodes.there.state.to_str().unwrap(),
        "--remote-imgpool",
        wrapper.to_str().unwrap(),
    ]);
    let line = failed_cleanly("a refresh of a target that changed meanwhile", &out);
    assert!(line.contains("changed since the plan"), "{line}");
    let names: Vec<String> = snapshot_list(&nodes.there, "v")
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(names, ["s1", "sneaky"], "the target's new snapshot stays");
}

#[test]
fn a_copy_on_a_terminal_shows_its_progress_and_prints_its_result() {
    let test = "a_copy_on_a_terminal_shows_its_progress_and_prints_its_result";
    if !can_mount(test) {
        return;
    }
    let mut nodes = Nodes::new();
    nodes.rewrite(256);
    nodes.snapshot(&nodes.here, "v@s1");
    nodes.rewrite(64);
    nodes.snapshot(&nodes.here, "v@s2");
    // script(1) gives the copy a pseudo-terminal and copies what it draws to its stdout.
    let typescript = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "IMGPOOL_STATE_DIR={} {BIN} copy v w",
            nodes.here.state.display()
        ))
        .arg("/dev/null")
        .env("TERM", "xterm")
        .env_remove("IMGPOOL_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&typescript.stdout);
    assert!(typescript.status.success(), "{screen}");
    assert!(
        screen.contains("package 1 of 2 (2 snapshot(s))")
            && screen.contains("snapshot 1 of 2")
            && screen.contains("MiB"),
        "no progress bar on the terminal: {screen:?}"
    );
    assert!(
        screen.contains("copied v to w: 2 snapshot(s)"),
        "{screen:?}"
    );
    let copied = state(&nodes.here, &nodes.mount_here, "w").unwrap();
    assert!(copied.live == nodes.model);
    // Off a terminal, nothing but the result lines.
    nodes.here.ok(&["volume", "rm", "--recursive", "w"]);
    let out = nodes.here.run(&["copy", "v", "w"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
