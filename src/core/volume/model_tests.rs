//! Model-based test of a volume and its snapshots: random writes (unaligned, across granules and
//! across the end of the base image), discards, resizes, flushes, snapshots, batch deletions,
//! reclaims, rollbacks and restarts (clean, and as after `kill -9`: whatever was not flushed may
//! or may not be there), each checked byte for byte against a plain model after every step.
//! Snapshot creation, deletion (names, ranges, `--older-than`, `--keep-last`, dry runs, batches
//! naming an unknown snapshot) and rollback go through the requests the commands send.
//!
//! `IMGPOOL_MODEL_SEEDS=N` runs N seeds (default 40).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::requests::{apply, Request, Selection};
use super::*;
use crate::error::ErrorKind;

thread_local! {
    /// How long this thread's volume reads wait between their lookup and their data read: the
    /// window in which a slot could be freed and handed out again under them.
    static READ_PAUSE: std::cell::Cell<Option<std::time::Duration>> = const { std::cell::Cell::new(None) };
}

pub(super) fn pause_between_lookup_and_read() {
    if let Some(pause) = READ_PAUSE.with(|p| p.get()) {
        std::thread::sleep(pause);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A base image held in memory.
struct Bytes(Arc<Vec<u8>>);

impl Base for Bytes {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
}

struct Model {
    live: Vec<u8>,
    /// In creation order.
    snapshots: Vec<ModelSnapshot>,
    /// The live content when the volume last made everything durable.
    durable: Vec<u8>,
    /// For each block written since then: every content it had since then. After a crash, the
    /// block holds one of them, or its durable content.
    unflushed: HashMap<u64, Vec<Vec<u8>>>,
}

struct ModelSnapshot {
    name: String,
    created: i64,
    content: Vec<u8>,
}

impl Model {
    fn made_durable(&mut self) {
        self.durable = self.live.clone();
        self.unflushed.clear();
    }

    fn touched(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for block in offset / BLOCK..=(offset + len - 1) / BLOCK {
            let start = (block * BLOCK) as usize;
            let end = (start + BLOCK as usize).min(self.live.len());
            let now = self.live[start..end].to_vec();
            self.unflushed.entry(block).or_default().push(now);
        }
    }
}

/// The epochs of the volume's snapshots, oldest first.
fn epochs(volume: &Volume) -> Vec<u64> {
    volume
        .snapshots()
        .unwrap()
        .iter()
        .map(|s| s.epoch)
        .collect()
}

/// A directory for a test volume: on tmpfs when there is one, where the syncs of every commit
/// cost nothing.
fn scratch_dir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn open(dir: &Path, size: u64, base: &Arc<Vec<u8>>) -> Arc<Volume> {
    Arc::new(open_for_test(dir, size, Box::new(Bytes(base.clone()))))
}

/// The live volume, or a snapshot through its reader.
#[derive(Clone, Copy)]
enum Content<'a> {
    Live(&'a Volume),
    Snapshot(&'a SnapshotReader),
}

impl Content<'_> {
    fn read_at(self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            Content::Live(v) => v.read_at(buf, offset),
            Content::Snapshot(r) => r.read_at(buf, offset),
        }
    }

    fn seek(self, offset: u64, hole: bool) -> io::Result<Option<u64>> {
        match self {
            Content::Live(v) => v.seek(offset, hole),
            Content::Snapshot(r) => r.seek(offset, hole),
        }
    }
}

fn read_all(content: Content, size: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![0u8; size + 100];
    // Read in pieces of random sizes, so that unaligned reads are checked as well.
    let mut at = 0;
    while at < out.len() {
        let n = (1 + rng.below(200_000) as usize).min(out.len() - at);
        let got = content.read_at(&mut out[at..at + n], at as u64).unwrap();
        assert_eq!(got, n.min(size.saturating_sub(at)), "short read at {at}");
        if got < n {
            break;
        }
        at += n;
    }
    out.truncate(size);
    out
}

fn check(volume: &Arc<Volume>, model: &Model, rng: &mut Rng, step: usize, op: &str) {
    assert_eq!(
        volume.size(),
        model.live.len() as u64,
        "step {step} {op}: size"
    );
    let live = read_all(Content::Live(volume), model.live.len(), rng);
    if live != model.live {
        let at = live.iter().zip(&model.live).position(|(a, b)| a != b);
        panic!("step {step} after {op}: the live volume differs from the model at byte {at:?}");
    }
    check_holes(Content::Live(volume), &live, step, op);
    let snapshots = volume.snapshots().unwrap();
    let names: Vec<&str> = snapshots.iter().map(|s| s.name.as_str()).collect();
    let expected: Vec<&str> = model.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, expected, "step {step} after {op}: snapshot list");
    for (snapshot, ModelSnapshot { name, content, .. }) in snapshots.iter().zip(&model.snapshots) {
        let reader = volume.open_snapshot(snapshot.epoch).unwrap();
        check_snapshot(
            &reader,
            content,
            rng,
            &format!("step {step} after {op}: {name}"),
        );
    }
}

/// A snapshot reads, byte for byte and hole for hole, as `content`.
fn check_snapshot(reader: &SnapshotReader, content: &[u8], rng: &mut Rng, what: &str) {
    assert_eq!(reader.snapshot().size, content.len() as u64, "{what}: size");
    let got = read_all(Content::Snapshot(reader), content.len(), rng);
    if got != content {
        let at = got.iter().zip(content).position(|(a, b)| a != b);
        panic!("{what}: the snapshot differs at byte {at:?}");
    }
    check_holes(Content::Snapshot(reader), content, 0, what);
}

/// SEEK_HOLE and SEEK_DATA agree with the content: every byte of a hole they report reads as
/// zero, and each answer lies at or after where the search started.
fn check_holes(volume: Content, live: &[u8], step: usize, op: &str) {
    let size = live.len() as u64;
    let mut pos = 0;
    while pos < size {
        let hole = volume
            .seek(pos, true)
            .unwrap()
            .expect("a hole before the end");
        assert!(
            hole >= pos && hole <= size,
            "step {step} after {op}: SEEK_HOLE({pos}) = {hole}"
        );
        if hole == size {
            break;
        }
        let data = volume.seek(hole, false).unwrap().unwrap_or(size);
        assert!(
            data > hole,
            "step {step} after {op}: SEEK_DATA({hole}) = {data}"
        );
        assert!(
            live[hole as usize..data as usize].iter().all(|b| *b == 0),
            "step {step} after {op}: the hole {hole}..{data} holds data"
        );
        pos = data;
    }
    assert_eq!(volume.seek(size, false).unwrap(), None);
}

#[test]
fn seek_finds_what_a_volume_wrote_and_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open_for_test(&dir.path().join("vol"), 8 * GRANULE, Box::new(NoBase));
    assert_eq!(
        volume.seek(0, false).unwrap(),
        None,
        "a new volume without image is a hole"
    );
    assert_eq!(volume.seek(100, true).unwrap(), Some(100));
    volume
        .write_at(&[7u8; 10], 5 * GRANULE + 3 * BLOCK + 1)
        .unwrap();
    let data = 5 * GRANULE + 3 * BLOCK;
    assert_eq!(volume.seek(0, false).unwrap(), Some(data));
    assert_eq!(volume.seek(data + 5, false).unwrap(), Some(data + 5));
    assert_eq!(volume.seek(data, true).unwrap(), Some(data + BLOCK));
    assert_eq!(volume.seek(data + BLOCK, false).unwrap(), None);
    volume.discard(data, BLOCK).unwrap();
    assert_eq!(
        volume.seek(0, false).unwrap(),
        None,
        "a discarded block is a hole"
    );
    // Over an image (all data, as far as `Bytes` says): data up to its end, zeros after.
    let dir = tempfile::tempdir().unwrap();
    let base = Arc::new(vec![1u8; (GRANULE + 100) as usize]);
    let volume = open(&dir.path().join("vol"), 4 * GRANULE, &base);
    assert_eq!(volume.seek(0, false).unwrap(), Some(0));
    assert_eq!(volume.seek(0, true).unwrap(), Some(GRANULE + 100));
    volume.discard(BLOCK, BLOCK).unwrap();
    assert_eq!(volume.seek(0, true).unwrap(), Some(BLOCK));
    assert_eq!(volume.seek(BLOCK, false).unwrap(), Some(2 * BLOCK));
}

/// After a crash: each block written since the last flush holds one of its contents since
/// then; the model takes what the volume holds.
fn settle_after_crash(volume: &Volume, model: &mut Model, step: usize, rng: &mut Rng) {
    let now = read_all(Content::Live(volume), model.live.len(), rng);
    for block in 0..(model.live.len() as u64).div_ceil(BLOCK) {
        let start = (block * BLOCK) as usize;
        let end = (start + BLOCK as usize).min(model.live.len());
        let got = &now[start..end];
        match model.unflushed.get(&block) {
            None => assert_eq!(
                got,
                &model.live[start..end],
                "step {step}: block {block} was flushed and changed in a crash"
            ),
            Some(contents) => assert!(
                contents.iter().any(|c| c.as_slice() == got) || &model.durable[start..end] == got,
                "step {step}: block {block} after a crash holds bytes no write put there"
            ),
        }
    }
    model.live = now;
    model.made_durable();
}

#[test]
fn random_operations_match_the_model_with_restarts() {
    let seeds: u64 = std::env::var("IMGPOOL_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 1..=seeds {
        run(seed, 150);
    }
}

/// A `snapshot rm` as the command sends it: names (now and then one that does not exist, which
/// refuses the whole batch), a range, `--older-than`, `--keep-last`; sometimes a dry run. What
/// it says it deleted is what the model expects, and the model follows.
fn delete_as_a_command(
    volume: &Volume,
    model: &mut Model,
    rng: &mut Rng,
    held_epoch: Option<u64>,
    (seed, step): (u64, usize),
) -> String {
    let count = model.snapshots.len();
    let names = |range: std::ops::RangeInclusive<usize>| -> Vec<String> {
        model.snapshots[range]
            .iter()
            .map(|s| s.name.clone())
            .collect()
    };
    let mut unknown = false;
    let (selection, mut expected) = match rng.below(4) {
        0 => {
            let mut chosen: Vec<String> = model
                .snapshots
                .iter()
                .filter(|_| rng.chance(40))
                .map(|s| s.name.clone())
                .collect();
            let expected = chosen.clone();
            if rng.chance(10) {
                chosen.insert(
                    rng.below(chosen.len() as u64 + 1) as usize,
                    "no-such".into(),
                );
                unknown = true;
            }
            (Selection::Names(chosen), expected)
        }
        1 => {
            let a = rng.below(count as u64) as usize;
            let b = rng.below(count as u64) as usize;
            let (first, last) = (a.min(b), a.max(b));
            let selection = Selection::Range {
                first: model.snapshots[first].name.clone(),
                last: model.snapshots[last].name.clone(),
            };
            (selection, names(first..=last))
        }
        2 => {
            let cut =
                model.snapshots[rng.below(count as u64) as usize].created + rng.below(2) as i64;
            let expected = model
                .snapshots
                .iter()
                .filter(|s| s.created < cut)
                .map(|s| s.name.clone())
                .collect();
            (Selection::OlderThan(cut), expected)
        }
        _ => {
            let keep = rng.below(count as u64 + 2) as usize;
            let expected = model.snapshots[..count.saturating_sub(keep)]
                .iter()
                .map(|s| s.name.clone())
                .collect();
            (Selection::KeepLast(keep), expected)
        }
    };
    let dry_run = rng.chance(20);
    let request = Request::Delete {
        selection: selection.clone(),
        dry_run,
    };
    let outcome = apply(volume, "vol", &request);
    if unknown {
        let e = outcome.expect_err("a batch naming an unknown snapshot was applied");
        assert!(
            e.to_string().contains("no-such"),
            "seed {seed} step {step}: {e}"
        );
        return "delete a batch naming an unknown snapshot (refused)".into();
    }
    let held = held_epoch.and_then(|e| {
        let all = volume.snapshots().unwrap();
        all.into_iter().find(|s| s.epoch == e).map(|s| s.name)
    });
    if let Some(held) = held.filter(|h| expected.contains(h)) {
        let e = outcome.expect_err("a batch taking a snapshot being read was applied");
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert!(
            e.to_string().contains(&held),
            "seed {seed} step {step}: {e}"
        );
        return format!("delete a batch taking the held snapshot {held} (refused)");
    }
    let outcome = outcome.unwrap_or_else(|e| panic!("seed {seed} step {step}: {selection:?}: {e}"));
    let mut deleted: Vec<String> = outcome.snapshots.into_iter().map(|s| s.name).collect();
    // Names are listed in the order given; the model's are in creation order.
    let position = |n: &String| model.snapshots.iter().position(|s| &s.name == n);
    deleted.sort_by_key(position);
    expected.sort_by_key(position);
    assert_eq!(deleted, expected, "seed {seed} step {step}: {selection:?}");
    if !dry_run {
        model.snapshots.retain(|s| !expected.contains(&s.name));
        model.made_durable();
    }
    format!(
        "delete {} snapshots by {selection:?}{}",
        expected.len(),
        if dry_run { " (dry run)" } else { "" }
    )
}

/// Each snapshot and the live volume, exported as an image is (`VolumeSource` through the
/// import's sparse copy), is the model's content: same bytes, same SHA-512, and the copy holds
/// no block the content has as zeros.
fn check_exports(volume: &Arc<Volume>, model: &Model, dir: &tempfile::TempDir, seed: u64) {
    use crate::format::sparse::{copy_sparse, SparseSource};
    use sha2::{Digest, Sha512};
    let snapshots = volume.snapshots().unwrap();
    let mut cases: Vec<(Option<&Snapshot>, &[u8], String)> = snapshots
        .iter()
        .zip(&model.snapshots)
        .map(|(s, m)| (Some(s), m.content.as_slice(), s.name.clone()))
        .collect();
    cases.push((None, &model.live, "the live volume".into()));
    for (snapshot, content, what) in cases {
        let source = VolumeSource::new(volume, snapshot).unwrap();
        assert_eq!(
            source.size(),
            content.len() as u64,
            "seed {seed}: size of {what}"
        );
        let extents = source.data_extents(source.size()).unwrap();
        let path = dir.path().join("export");
        let copy = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let outcome = copy_sparse(
            &source,
            Some(&copy),
            source.size(),
            64 << 10,
            true,
            &mut |_, _| Ok(()),
        )
        .unwrap();
        let exported = std::fs::read(&path).unwrap();
        if exported != content {
            let at = exported.iter().zip(content).position(|(a, b)| a != b);
            panic!(
                "seed {seed}: the export of {what} differs at byte {at:?} (extents {extents:?})"
            );
        }
        assert_eq!(
            outcome.sha512,
            Some(hex::encode(Sha512::digest(content))),
            "seed {seed}: {what}"
        );
        use std::os::unix::fs::MetadataExt;
        let stored = copy.metadata().unwrap().blocks() * 512;
        let data = content
            .chunks(4096)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64
            * 4096;
        assert!(
            stored <= data,
            "seed {seed}: {what}: {stored} bytes stored for {data} of data"
        );
    }
}

fn run(seed: u64, steps: usize) {
    let dir = scratch_dir();
    let vdir = dir.path().join("vol");
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // A base image that ends inside a block, and a volume larger than it.
    let base_len = 3 * GRANULE as usize + 5 * BLOCK as usize + 1234;
    let base: Arc<Vec<u8>> = Arc::new((0..base_len).map(|_| rng.next() as u8).collect());
    let size = 6 * GRANULE;
    let mut volume = open(&vdir, size, &base);
    let mut live = vec![0u8; size as usize];
    live[..base_len].copy_from_slice(&base);
    let mut model = Model {
        live,
        snapshots: Vec::new(),
        durable: Vec::new(),
        unflushed: HashMap::new(),
    };
    model.made_durable();
    let mut next_snapshot = 0;
    // A snapshot held open by a reader across steps (as a file of the mount is), with what it
    // must read: deleting it is refused, and nothing it reads is reclaimed under it.
    let mut held: Option<(SnapshotReader, Vec<u8>)> = None;
    for step in 0..steps {
        if rng.chance(10) {
            held = None;
            if !model.snapshots.is_empty() && rng.chance(70) {
                let at = rng.below(model.snapshots.len() as u64) as usize;
                let snapshot = &volume.snapshots().unwrap()[at];
                let reader = volume.open_snapshot(snapshot.epoch).unwrap();
                held = Some((reader, model.snapshots[at].content.clone()));
            }
        }
        let held_epoch = held.as_ref().map(|(r, _)| r.snapshot().epoch);
        let roll = rng.below(100);
        let size = model.live.len() as u64;
        let op;
        if roll < 35 {
            // A write: unaligned or aligned, small or across granules.
            let aligned = rng.chance(40);
            let len = if rng.chance(70) {
                1 + rng.below(3 * BLOCK)
            } else {
                1 + rng.below(2 * GRANULE)
            };
            let (offset, len) = if aligned {
                let len = len.div_ceil(BLOCK) * BLOCK;
                (rng.below(size / BLOCK) * BLOCK, len)
            } else {
                (rng.below(size), len)
            };
            let len = len.min(size - offset);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            volume.write_at(&data, offset).unwrap();
            model.live[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            model.touched(offset, len);
            op = format!("write {offset}+{len}");
        } else if roll < 45 {
            let offset = rng.below(size);
            let len = (1 + rng.below(2 * GRANULE)).min(size - offset);
            volume.discard(offset, len).unwrap();
            model.live[offset as usize..(offset + len) as usize].fill(0);
            model.touched(offset, len);
            op = format!("discard {offset}+{len}");
        } else if roll < 52 {
            volume.flush().unwrap();
            model.made_durable();
            op = "flush".into();
        } else if roll < 62 {
            // Now and then a name taken already: refused, nothing changes.
            let name = match model.snapshots.last() {
                Some(last) if rng.chance(5) => last.name.clone(),
                _ => {
                    next_snapshot += 1;
                    format!("s{next_snapshot}")
                }
            };
            let created = step as i64;
            let create = Request::Create {
                name: name.clone(),
                guid: format!("guid-{name}"),
                created,
            };
            match apply(&volume, "vol", &create) {
                Ok(_) => {
                    model.snapshots.push(ModelSnapshot {
                        name: name.clone(),
                        created,
                        content: model.live.clone(),
                    });
                    model.made_durable();
                    op = format!("snapshot {name}");
                }
                Err(e) => {
                    assert!(
                        model.snapshots.iter().any(|s| s.name == name),
                        "seed {seed} step {step}: snapshot {name} refused: {e}"
                    );
                    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
                    op = format!("snapshot {name} again (refused)");
                }
            }
        } else if roll < 69 && !model.snapshots.is_empty() {
            op = delete_as_a_command(&volume, &mut model, &mut rng, held_epoch, (seed, step));
        } else if roll < 79 {
            let steps = 1 + rng.below(3);
            for _ in 0..steps {
                volume.reclaim().unwrap();
            }
            model.made_durable();
            op = "reclaim".into();
        } else if roll < 83 && !model.snapshots.is_empty() {
            // Rollback to a random snapshot: refused while newer ones exist, unless they go
            // with it.
            let target = rng.below(model.snapshots.len() as u64) as usize;
            let name = model.snapshots[target].name.clone();
            let destroy_newer = rng.chance(70);
            let rollback = Request::Rollback {
                name: name.clone(),
                destroy_newer,
            };
            let newest = target + 1 == model.snapshots.len();
            let over_held = held_epoch.is_some_and(|e| {
                let all = volume.snapshots().unwrap();
                all[target + 1..].iter().any(|s| s.epoch == e)
            });
            match apply(&volume, "vol", &rollback) {
                Err(e) if destroy_newer && over_held => {
                    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
                    op = format!("rollback to {name} over a held snapshot (refused)");
                }
                Ok(outcome) => {
                    assert!(
                        (destroy_newer && !over_held) || newest,
                        "seed {seed} step {step}: rolled back over newer snapshots"
                    );
                    let destroyed: Vec<&str> =
                        outcome.snapshots.iter().map(|s| s.name.as_str()).collect();
                    let newer: Vec<&str> = model.snapshots[target + 1..]
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect();
                    assert_eq!(
                        destroyed, newer,
                        "seed {seed} step {step}: destroyed by the rollback"
                    );
                    model.snapshots.truncate(target + 1);
                    model.live = model.snapshots[target].content.clone();
                    model.made_durable();
                    op = format!("rollback to {name}");
                }
                Err(e) => {
                    assert!(
                        !destroy_newer && !newest,
                        "seed {seed} step {step}: rollback refused: {e}"
                    );
                    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
                    op = format!("rollback to {name} without --destroy-newer (refused)");
                }
            }
        } else if roll < 86 {
            let grow = rng.below(3) * BLOCK * (1 + rng.below(20));
            volume.resize(size + grow).unwrap();
            model.live.resize((size + grow) as usize, 0);
            model.made_durable();
            op = format!("resize +{grow}");
        } else if roll < 93 {
            // kill -9: nothing is flushed on the way out.
            held = None;
            drop(volume);
            volume = open(&vdir, 0, &base);
            settle_after_crash(&volume, &mut model, step, &mut rng);
            op = "crash and restart".into();
        } else {
            held = None;
            volume.shutdown().unwrap();
            drop(volume);
            volume = open(&vdir, 0, &base);
            model.made_durable();
            op = "clean restart".into();
        }
        check(&volume, &model, &mut rng, step, &op);
        if let Some((reader, content)) = &held {
            check_snapshot(
                reader,
                content,
                &mut rng,
                &format!("step {step} after {op}: held"),
            );
        }
    }
    drop(held);
    check_exports(&volume, &model, &dir, seed);

    // Every snapshot deleted and reclaimed: only the live versions remain, and the data file
    // holds only what they hold.
    let all: Vec<u64> = epochs(&volume);
    volume.delete_snapshots(&all).unwrap();
    while volume.reclaim().unwrap() {}
    model.snapshots.clear();
    check(
        &volume,
        &model,
        &mut rng,
        steps,
        "deleting and reclaiming everything",
    );
    let (rows, live_rows, live_blocks) = volume.footprint();
    assert_eq!(
        rows, live_rows,
        "seed {seed}: versions no snapshot sees are left"
    );
    // The filesystem counts its extent tree blocks in the file's blocks too.
    let data = volume.data_bytes();
    assert!(
        data <= live_blocks * BLOCK + 16 * BLOCK,
        "seed {seed}: the data file holds {data} bytes for {live_blocks} live blocks"
    );
}

/// Readers racing writes, discards, snapshots, deletions and reclaims never see another
/// block's bytes: every block read holds its own address (or zeros), however slots are freed
/// and handed out again meanwhile.
#[test]
fn concurrent_reads_never_see_another_blocks_bytes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = scratch_dir();
    let blocks = 4 * GRANULE / BLOCK;
    let volume = open(
        &dir.path().join("vol"),
        blocks * BLOCK,
        &Arc::new(Vec::new()),
    );
    let stamp = |block: u64, version: u64| -> Vec<u8> {
        let mut data = vec![0u8; BLOCK as usize];
        for word in data.chunks_mut(16) {
            word[..8].copy_from_slice(&block.to_le_bytes());
            word[8..].copy_from_slice(&(version + 1).to_le_bytes());
        }
        data
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        for reader in 0..3u64 {
            let (volume, done) = (&volume, &done);
            s.spawn(move || {
                READ_PAUSE.with(|p| p.set(Some(std::time::Duration::from_micros(300))));
                let mut rng = Rng(reader + 7);
                let mut buf = vec![0u8; BLOCK as usize];
                while !done.load(Ordering::Relaxed) {
                    let block = rng.below(blocks);
                    volume.read_at(&mut buf, block * BLOCK).unwrap();
                    let owner = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    assert!(
                        buf.iter().all(|b| *b == 0) || owner == block,
                        "block {block} read the bytes of block {owner}"
                    );
                }
            });
        }
        let mut rng = Rng(99);
        let per_granule = GRANULE / BLOCK;
        for step in 0..6_000u64 {
            // Whole granules mostly: a discard frees a slot whose every block another granule's
            // next write fills.
            let granule = rng.below(blocks / per_granule);
            let first = granule * per_granule;
            match rng.below(100) {
                0..=44 => {
                    let data: Vec<u8> = (first..first + per_granule)
                        .flat_map(|b| stamp(b, step))
                        .collect();
                    volume.write_at(&data, first * BLOCK).unwrap();
                }
                45..=79 => volume.discard(first * BLOCK, GRANULE).unwrap(),
                80..=82 => {
                    volume.snapshot(&format!("s{step}"), "g", 0).unwrap();
                }
                83..=85 => {
                    let all: Vec<u64> = epochs(&volume);
                    let doomed: Vec<u64> = all.into_iter().filter(|_| rng.chance(50)).collect();
                    volume.delete_snapshots(&doomed).unwrap();
                }
                86..=88 => while volume.reclaim().unwrap() {},
                _ => volume.flush().unwrap(),
            }
        }
        done.store(true, Ordering::Relaxed);
    });
}

/// A snapshot's unique bytes are what deleting it alone frees.
#[test]
fn unique_bytes_are_what_deleting_a_snapshot_alone_frees() {
    let dir = scratch_dir();
    let volume = open_for_test(&dir.path().join("vol"), 4 * GRANULE, Box::new(NoBase));
    volume.write_at(&vec![1u8; GRANULE as usize], 0).unwrap();
    volume
        .write_at(&vec![2u8; 2 * BLOCK as usize], GRANULE)
        .unwrap();
    volume.snapshot("a", "g", 0).unwrap();
    volume.write_at(&[3u8; 100], 5).unwrap();
    volume.snapshot("b", "g", 0).unwrap();
    volume.write_at(&[4u8; 100], 5).unwrap();
    let unique: Vec<(String, u64)> = volume
        .snapshots_with_unique_bytes()
        .unwrap()
        .into_iter()
        .map(|(s, bytes)| (s.name, bytes))
        .collect();
    // Granule 0 had a version seen by `a` alone, and one seen by `b` alone (each whole, as the
    // first write after each snapshot copied the granule's blocks); granule 1 is shared by all.
    assert_eq!(unique, [("a".into(), GRANULE), ("b".into(), GRANULE)]);
    volume.flush().unwrap();
    let before = volume.data_bytes();
    let a = volume.find_snapshot("a").unwrap().unwrap();
    let files = VolumeFiles::new(&dir.path().join("vol"));
    assert_eq!(reclaim_pending_bytes(&files).unwrap(), 0);
    volume.delete_snapshots(&[a.epoch]).unwrap();
    // Until the reclaim ran, what `a` alone held is still to give back, as listings say.
    assert_eq!(reclaim_pending_bytes(&files).unwrap(), GRANULE);
    while volume.reclaim().unwrap() {}
    assert_eq!(before - volume.data_bytes(), GRANULE);
    assert_eq!(reclaim_pending_bytes(&files).unwrap(), 0);
}

/// Once its writer closed it (`shutdown`), a volume a reclaim thread still holds writes
/// nothing more: the writer lock may already be someone else's.
#[test]
fn a_closed_volume_writes_nothing_more() {
    let dir = scratch_dir();
    let volume = open_for_test(&dir.path().join("vol"), 4 * GRANULE, Box::new(NoBase));
    volume.write_at(&[1u8; 4096], 0).unwrap();
    volume.snapshot("a", "g", 0).unwrap();
    volume.write_at(&[2u8; 4096], 0).unwrap();
    let a = volume.find_snapshot("a").unwrap().unwrap();
    volume.delete_snapshots(&[a.epoch]).unwrap();
    volume.shutdown().unwrap();
    assert!(!volume.reclaim().unwrap(), "a closed volume reclaimed");
    assert!(volume.write_at(&[3u8; 4096], 0).is_err());
    assert!(volume.snapshot("b", "g", 0).is_err());
    drop(volume);
    // Reopened: the reclaim left to do is still there, and done now.
    let volume = open_for_test(&dir.path().join("vol"), 0, Box::new(NoBase));
    assert!(volume.reclaim().unwrap());
    let mut buf = [0u8; 4096];
    volume.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [2u8; 4096]);
}

/// A snapshot being read keeps reading what it held while the volume is rewritten, the
/// snapshots around it are deleted and their space reclaimed and reused; deleting it is refused
/// (naming it) until its reader is dropped.
#[test]
fn a_snapshot_being_read_is_not_deleted_nor_reclaimed_under_its_reader() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = scratch_dir();
    let size = 4 * GRANULE;
    let volume = Arc::new(open_for_test(
        &dir.path().join("vol"),
        size,
        Box::new(NoBase),
    ));
    let fill = |byte: u8| volume.write_at(&vec![byte; size as usize], 0).unwrap();
    fill(1);
    volume.snapshot("before", "g", 0).unwrap();
    fill(2);
    let held = volume.snapshot("held", "g", 0).unwrap();
    let reader = volume.open_snapshot(held.epoch).unwrap();
    let refused = volume.delete_snapshots(&[held.epoch]).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ResourceBusy);
    assert!(refused.to_string().contains("'held'"), "{refused}");
    let done = AtomicBool::new(false);
    let reads = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        let (reader, done, reads) = (&reader, &done, &reads);
        s.spawn(move || {
            READ_PAUSE.with(|p| p.set(Some(std::time::Duration::from_micros(200))));
            let mut buf = vec![0u8; GRANULE as usize];
            while !done.load(Ordering::Relaxed) {
                for granule in 0..4 {
                    reader.read_at(&mut buf, granule * GRANULE).unwrap();
                    assert!(buf.iter().all(|b| *b == 2), "the held snapshot changed");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let mut round = 0u8;
        while round < 30 || reads.load(Ordering::Relaxed) < 400 {
            round = round.wrapping_add(1);
            fill(3 + round % 200);
            volume.snapshot(&format!("after{round}"), "g", 0).unwrap();
            let others: Vec<u64> = epochs(&volume)
                .into_iter()
                .filter(|e| *e != held.epoch)
                .collect();
            volume.delete_snapshots(&others).unwrap();
            while volume.reclaim().unwrap() {}
        }
        done.store(true, Ordering::Relaxed);
    });
    assert_eq!(volume.snapshots_being_read(), ["held"]);
    drop(reader);
    assert!(volume.snapshots_being_read().is_empty());
    volume.delete_snapshots(&[held.epoch]).unwrap();
    while volume.reclaim().unwrap() {}
    let (rows, live_rows, _) = volume.footprint();
    assert_eq!(
        rows, live_rows,
        "the held snapshot's versions were reclaimed once it went"
    );
}

/// Snapshots by name prefix (an export's temporary ones) come from a range of the name index,
/// exactly those that start with it.
#[test]
fn snapshots_named_by_prefix_are_exactly_those_that_start_with_it() {
    let dir = scratch_dir();
    let volume = open_for_test(&dir.path().join("vol"), GRANULE, Box::new(NoBase));
    for name in [
        "export-tmp",
        "export-tmp-a",
        "export-tmp-b",
        "export-tmq",
        "export-tmp-",
        "x",
    ] {
        volume.snapshot(name, "g", 0).unwrap();
    }
    volume.close().unwrap();
    let files = VolumeFiles::new(&dir.path().join("vol"));
    assert_eq!(
        snapshots_named(&files, "export-tmp-").unwrap(),
        ["export-tmp-a", "export-tmp-b", "export-tmp-"]
    );
}
