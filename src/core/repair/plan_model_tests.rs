//! Model-based test of the repair planner and the copy state machine together: random sequences
//! of disk failures and returns, evictions, disks that vanish and come back, copy-count changes,
//! read faults and rotting chunks, with repair rounds in between. The pool is a plain model
//! (disks, images, copies with a "corrupt" flag); the planner is the real `plan::plan` over a
//! `PoolState` made from the model, and every copy change goes through the real
//! `copies::decide`, with the store's rule for the other copies.
//!
//! Checked after every step:
//! - no plan removes, and no step fails, the last good copy of an image (an image that served
//!   keeps serving, unless its disks went away);
//! - no copy serves before it has been verified (or written and checked), and a copy that
//!   becomes good in a round is not corrupt;
//! - new copies are made only from good copies (or the image's source file, when none is left);
//! - once the faults stop, repair converges: each image has exactly its policy's count of copies
//!   when the disks allow it, and the planner then has nothing left to do.

use std::collections::HashMap;
use std::path::PathBuf;

use super::plan::{plan, Action, DiskView, ImageView, PoolState, Source, SourceFile, Space};
use crate::core::copies::{decide, CopyView, Event, Others, Outcome};
use crate::core::placement;
use crate::core::store::{CopyRow, CopyState, DiskRow, DiskState, FailedBy, ImageRow, ImageState};

/// xorshift64*: a small deterministic generator, so that a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Debug, Clone)]
struct Disk {
    id: i64,
    state: DiskState,
    reachable: bool,
    device: u64,
    capacity: u64,
}

#[derive(Debug, Clone)]
struct Image {
    id: i64,
    wanted: u32,
    size: u64,
    source_usable: bool,
}

#[derive(Debug, Clone)]
struct Copy {
    image: i64,
    disk: i64,
    state: CopyState,
    /// Its bytes differ from the image's (rot, a bad sector).
    corrupt: bool,
    /// Read whole and checked (or written and checked) since it was last untrusted.
    checked: bool,
}

struct Model {
    disks: Vec<Disk>,
    images: Vec<Image>,
    copies: Vec<Copy>,
    rng: Rng,
    log: Vec<String>,
    /// Whether other processes act between a plan and its actions (not once faults stop).
    concurrent_faults: bool,
}

impl Model {
    fn new(seed: u64) -> Model {
        let mut rng = Rng(seed | 1);
        let disk_count = 3 + rng.below(3);
        let disks = (1..=disk_count as i64)
            .map(|id| Disk {
                id,
                state: DiskState::Healthy,
                reachable: true,
                // Disks 4 and 5 share a filesystem with disks 1 and 2.
                device: if id > 3 { id as u64 - 3 } else { id as u64 },
                // Room for every image on every disk, twice over (disks share filesystems).
                capacity: 8_000 + rng.below(4) as u64 * 1_000,
            })
            .collect::<Vec<_>>();
        let images: Vec<Image> = (1..=(2 + rng.below(3)) as i64)
            .map(|id| Image {
                id,
                wanted: 1 + rng.below(3) as u32,
                size: 50 + rng.below(400) as u64,
                source_usable: rng.chance(50),
            })
            .collect();
        let mut model = Model {
            disks,
            images,
            copies: Vec::new(),
            rng,
            log: Vec::new(),
            concurrent_faults: true,
        };
        // Each image imported on distinct disks, as `image add` places it.
        for image in model.images.clone() {
            let mut placed = 0;
            for disk in model.disks.clone() {
                if placed < image.wanted {
                    model.copies.push(Copy {
                        image: image.id,
                        disk: disk.id,
                        state: CopyState::Ready,
                        corrupt: false,
                        checked: true,
                    });
                    placed += 1;
                }
            }
        }
        model.disks.rotate_left(model.rng.below(disk_count));
        model
    }

    fn disk(&self, id: i64) -> &Disk {
        self.disks.iter().find(|d| d.id == id).unwrap()
    }

    fn used(&self, device: u64) -> u64 {
        self.copies
            .iter()
            .filter(|c| self.disk(c.disk).device == device)
            .map(|c| self.images.iter().find(|i| i.id == c.image).unwrap().size)
            .sum()
    }

    fn free(&self, disk: &Disk) -> u64 {
        disk.capacity.saturating_sub(self.used(disk.device))
    }

    fn view(&self, copy: &Copy) -> CopyView {
        let disk = self.disk(copy.disk);
        CopyView {
            state: copy.state,
            disk: disk.state,
            reachable: disk.reachable,
        }
    }

    /// The image's other copies as `Pool::copy_event` counts them: by the store's rule, without
    /// the disks found unreachable just now.
    fn others(&self, image: i64, disk: i64) -> Others {
        let mut others = Others::default();
        for copy in self
            .copies
            .iter()
            .filter(|c| c.image == image && c.disk != disk)
        {
            let view = self.view(copy);
            others.good += view.is_good() as u32;
            others.counting += view.counts() as u32;
            others.serving += view.serves() as u32;
        }
        others
    }

    /// Applies an event through the real state machine; returns the outcome.
    fn event(&mut self, image: i64, disk: i64, event: Event) -> Outcome {
        let others = self.others(image, disk);
        let index = self
            .copies
            .iter()
            .position(|c| c.image == image && c.disk == disk);
        let outcome = decide(index.map(|i| self.copies[i].state), event, others);
        match (index, outcome) {
            (Some(i), Outcome::Now(state)) => self.copies[i].state = state,
            (None, Outcome::Now(state)) => self.copies.push(Copy {
                image,
                disk,
                state,
                corrupt: false,
                checked: false,
            }),
            (Some(i), Outcome::Deleted) => {
                self.copies.remove(i);
            }
            _ => {}
        }
        outcome
    }

    fn state(&self, refused: &HashMap<i64, Vec<i64>>) -> PoolState {
        PoolState {
            disks: self
                .disks
                .iter()
                .map(|d| DiskView {
                    row: disk_row(d),
                    reachable: d.reachable,
                    read_only: false,
                    space: (d.state == DiskState::Healthy && d.reachable).then(|| Space {
                        device: d.device,
                        capacity: d.capacity,
                        free: self.free(d),
                    }),
                })
                .collect(),
            images: self
                .images
                .iter()
                .map(|i| ImageView {
                    row: image_row(i),
                    copies: self
                        .copies
                        .iter()
                        .filter(|c| c.image == i.id)
                        .map(|c| CopyRow {
                            image_id: c.image,
                            disk: disk_row(self.disk(c.disk)),
                            state: c.state,
                            reason: None,
                            since: 0,
                        })
                        .collect(),
                    source: if i.source_usable {
                        SourceFile::Usable(PathBuf::from(format!("/src/{}", i.id)))
                    } else {
                        SourceFile::Unusable("its source file is unknown".into())
                    },
                })
                .collect(),
            refused: refused.clone(),
        }
    }

    fn count(&self, image: i64, rule: impl Fn(CopyView) -> bool) -> usize {
        self.copies
            .iter()
            .filter(|c| c.image == image && rule(self.view(c)))
            .count()
    }

    /// One `repair`: rounds until the plan is empty or a round makes no progress. Returns
    /// whether another process failed a disk meanwhile.
    fn repair(&mut self) -> bool {
        let mut disturbed = false;
        let mut refused: HashMap<i64, Vec<i64>> = HashMap::new();
        for _ in 0..20 {
            let state = self.state(&refused);
            let planned = plan(&state);
            self.check_plan(&state, &planned.actions);
            if planned.actions.is_empty() {
                return disturbed;
            }
            let mut progressed = false;
            let (creates, others): (Vec<_>, Vec<_>) = planned
                .actions
                .into_iter()
                .partition(|a| matches!(a, Action::Create { .. }));
            for action in others.into_iter().chain(creates) {
                // Another process (the health monitor, an operator) acts between the snapshot
                // and this action: the action must still not cost the last serving copy.
                if self.concurrent_faults && self.rng.chance(3) {
                    let pick = self.rng.below(self.disks.len());
                    self.log
                        .push(format!("  meanwhile: fail disk {}", self.disks[pick].id));
                    self.disks[pick].state = DiskState::Failed;
                    disturbed = true;
                }
                let serving = self.serving_images();
                let ready_before: Vec<(i64, i64)> = self
                    .copies
                    .iter()
                    .filter(|c| c.state == CopyState::Ready)
                    .map(|c| (c.image, c.disk))
                    .collect();
                progressed |= self.execute(&action, &mut refused);
                for image in &serving {
                    assert!(
                        self.count(*image, CopyView::serves) > 0,
                        "{} took the last serving copy of image {image}\n{}",
                        describe(&action),
                        self.log.join("\n")
                    );
                }
                for copy in &self.copies {
                    let new = !ready_before.contains(&(copy.image, copy.disk));
                    assert!(
                        !(new && copy.state == CopyState::Ready && copy.corrupt),
                        "{} made a corrupt copy good: {copy:?}\n{}",
                        describe(&action),
                        self.log.join("\n")
                    );
                }
            }
            if !progressed {
                return disturbed;
            }
        }
        panic!(
            "repair did not settle in 20 rounds\n{}",
            self.log.join("\n")
        );
    }

    /// Runs one action as the executor does, with the state machine's checks.
    fn execute(&mut self, action: &Action, refused: &mut HashMap<i64, Vec<i64>>) -> bool {
        self.log.push(format!("  {}", describe(action)));
        match action {
            Action::Verify { image, disk } => {
                let Some(copy) = self
                    .copies
                    .iter_mut()
                    .find(|c| c.image == image.id && c.disk == disk.id)
                else {
                    return false;
                };
                copy.checked = true;
                let event = if copy.corrupt {
                    Event::Faulted("does not match")
                } else {
                    Event::Verified
                };
                self.event(image.id, disk.id, event) != Outcome::Unchanged
            }
            Action::Remove {
                image,
                disk,
                keep,
                count_evicting,
                ..
            } => {
                let remove = Event::Remove {
                    keep: *keep,
                    count_evicting: *count_evicting,
                };
                if self.event(image.id, disk.id, remove) == Outcome::Now(CopyState::Removing) {
                    self.event(image.id, disk.id, Event::Deleted);
                    true
                } else {
                    false
                }
            }
            Action::Create {
                image,
                target,
                source,
            } => {
                let size = image.real_size;
                let target_disk = self.disk(target.id).clone();
                let room =
                    self.free(&target_disk) >= size + placement::reserve(target_disk.capacity);
                let source_good = match source {
                    Source::Copy(from) => self
                        .copies
                        .iter()
                        .find(|c| c.image == image.id && c.disk == from.id)
                        .map(|c| (c.corrupt, c.state)),
                    Source::File(_) => Some((false, CopyState::Ready)),
                };
                if let (Some((true, _)), Source::Copy(from)) = (source_good, source) {
                    // The new copy does not match the image: the source is at fault, the target
                    // is not to blame.
                    self.event(image.id, from.id, Event::Faulted("a copy from it failed"));
                    return true;
                }
                if !room {
                    refused.entry(image.id).or_default().push(target.id);
                    return true;
                }
                assert_eq!(
                    self.event(image.id, target.id, Event::StartCopy),
                    Outcome::Now(CopyState::Copying)
                );
                assert_eq!(
                    self.event(image.id, target.id, Event::Committed),
                    Outcome::Now(CopyState::Ready)
                );
                let copy = self
                    .copies
                    .iter_mut()
                    .find(|c| c.image == image.id && c.disk == target.id)
                    .unwrap();
                copy.checked = true;
                true
            }
        }
    }

    /// What the planner proposes never takes an image below its last good copy or below its
    /// policy, and new copies come only from good copies (or the source file, with none left).
    fn check_plan(&self, state: &PoolState, actions: &[Action]) {
        for image in &self.images {
            let removed: Vec<i64> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Remove { image: i, disk, .. } if i.id == image.id => Some(disk.id),
                    _ => None,
                })
                .collect();
            let kept = |rule: &dyn Fn(CopyView) -> bool| {
                self.copies
                    .iter()
                    .filter(|c| c.image == image.id && !removed.contains(&c.disk))
                    .filter(|c| rule(self.view(c)))
                    .count()
            };
            let good_before = self.count(image.id, CopyView::is_good);
            let counting_before = self.count(image.id, CopyView::counts);
            assert!(
                good_before == 0 || kept(&CopyView::is_good) > 0,
                "the plan removes the last good copy of image {}\n{}",
                image.id,
                self.log.join("\n")
            );
            assert!(
                kept(&CopyView::counts) >= counting_before.min(image.wanted as usize),
                "the plan takes image {} below its policy\n{}",
                image.id,
                self.log.join("\n")
            );
        }
        for action in actions {
            if let Action::Create { image, source, .. } = action {
                let view = state.images.iter().find(|i| i.row.id == image.id).unwrap();
                let any_good = view.copies.iter().any(|c| state.view(c).is_good());
                match source {
                    Source::Copy(disk) => {
                        let copy = view.copies.iter().find(|c| c.disk.id == disk.id).unwrap();
                        assert!(
                            state.view(copy).is_good(),
                            "a copy from a copy that is not good"
                        );
                    }
                    Source::File(_) => {
                        assert!(!any_good, "the source file while a good copy exists")
                    }
                }
            }
        }
    }

    /// Copies that serve have been checked; images that served still serve.
    fn check(&self, served_before: &[i64], may_lose_service: bool) {
        for copy in &self.copies {
            let view = self.view(copy);
            assert!(
                !view.serves() || copy.checked,
                "a copy serves before it was verified: {copy:?}\n{}",
                self.log.join("\n")
            );
        }
        if !may_lose_service {
            for image in served_before {
                assert!(
                    self.count(*image, CopyView::serves) > 0,
                    "image {image} stopped serving\n{}",
                    self.log.join("\n")
                );
            }
        }
    }

    fn serving_images(&self) -> Vec<i64> {
        self.images
            .iter()
            .filter(|i| self.count(i.id, CopyView::serves) > 0)
            .map(|i| i.id)
            .collect()
    }

    /// One random step; returns whether the step may legitimately stop an image from serving
    /// (its disks failed or vanished).
    fn step(&mut self) -> bool {
        let disk_count = self.disks.len();
        let pick = self.rng.below(disk_count);
        let disk_id = self.disks[pick].id;
        match self.rng.below(10) {
            0 => {
                self.log.push(format!("fail disk {disk_id}"));
                self.disks[pick].state = DiskState::Failed;
                true
            }
            1 => {
                if self.disks[pick].state == DiskState::Failed {
                    self.log.push(format!("return disk {disk_id}"));
                    self.disks[pick].state = DiskState::Healthy;
                    for image in self.images.clone() {
                        let on_disk = self
                            .copies
                            .iter()
                            .any(|c| c.image == image.id && c.disk == disk_id);
                        if on_disk {
                            self.event(image.id, disk_id, Event::DiskReturned);
                            if let Some(c) = self
                                .copies
                                .iter_mut()
                                .find(|c| c.image == image.id && c.disk == disk_id)
                            {
                                c.checked = c.state != CopyState::Unverified && c.checked;
                            }
                        }
                    }
                }
                false
            }
            2 => {
                if self.disks[pick].state == DiskState::Healthy {
                    self.log.push(format!("evict disk {disk_id}"));
                    self.disks[pick].state = DiskState::Evicting;
                }
                false
            }
            3 => {
                self.log.push(format!("unplug/replug disk {disk_id}"));
                self.disks[pick].reachable = !self.disks[pick].reachable;
                true
            }
            4 => {
                let image = self.rng.below(self.images.len());
                let wanted = 1 + self.rng.below(3) as u32;
                self.log
                    .push(format!("image {} wants {wanted}", self.images[image].id));
                self.images[image].wanted = wanted;
                false
            }
            5 => {
                // Rot: a copy's bytes change where nobody reads them.
                if !self.copies.is_empty() {
                    let i = self.rng.below(self.copies.len());
                    self.log.push(format!(
                        "rot {:?}",
                        (self.copies[i].image, self.copies[i].disk)
                    ));
                    self.copies[i].corrupt = true;
                }
                false
            }
            6 => {
                // A reader hits a bad chunk of a corrupt serving copy, on a disk that passes its
                // probe: the read path reports it and the copy is faulted.
                let serving: Vec<(i64, i64)> = self
                    .copies
                    .iter()
                    .filter(|c| c.corrupt && self.view(c).serves())
                    .map(|c| (c.image, c.disk))
                    .collect();
                if !serving.is_empty() {
                    let (image, disk) = serving[self.rng.below(serving.len())];
                    self.log.push(format!("read fault on {:?}", (image, disk)));
                    self.event(image, disk, Event::Faulted("chunk does not match"));
                }
                false
            }
            _ => {
                self.log.push("repair".into());
                self.repair()
            }
        }
    }

    /// Faults stop, every disk comes back in service, and the repair runs to the end: each
    /// image that still has a good copy, an intact copy to verify or its source file reaches its
    /// policy exactly (the disks are large enough for every image on every disk).
    fn settle(&mut self) {
        self.concurrent_faults = false;
        for disk in &mut self.disks {
            disk.reachable = true;
        }
        for i in 0..self.disks.len() {
            if self.disks[i].state == DiskState::Failed {
                let id = self.disks[i].id;
                self.disks[i].state = DiskState::Healthy;
                for image in self.images.clone() {
                    self.event(image.id, id, Event::DiskReturned);
                }
                for copy in self.copies.iter_mut().filter(|c| c.disk == id) {
                    if copy.state == CopyState::Unverified {
                        copy.checked = false;
                    }
                }
            }
        }
        self.log
            .push("settle: every disk back, repair to the end".into());
        self.repair();
        self.repair();
        let healthy = self
            .disks
            .iter()
            .filter(|d| d.state == DiskState::Healthy)
            .count();
        for image in &self.images {
            let copies: Vec<&Copy> = self.copies.iter().filter(|c| c.image == image.id).collect();
            let intact = copies
                .iter()
                .any(|c| !c.corrupt && c.state != CopyState::Failed);
            // A re-import needs a disk: one without a copy of the image, or one whose copy can
            // be given up without the image's last serving copy.
            let room_for_source =
                self.disks.iter().any(|d| {
                    d.state == DiskState::Healthy && !copies.iter().any(|c| c.disk == d.id)
                }) || copies.iter().any(|c| c.state == CopyState::Failed)
                    || copies
                        .iter()
                        .filter(|c| c.state == CopyState::Damaged)
                        .count()
                        > 1;
            let recoverable = intact || (image.source_usable && room_for_source);
            let counting = self.count(image.id, CopyView::counts);
            if recoverable && healthy >= image.wanted as usize {
                assert_eq!(
                    counting,
                    image.wanted as usize,
                    "image {image:?} did not converge to its policy: {:?}\n{}",
                    self.copies
                        .iter()
                        .filter(|c| c.image == image.id)
                        .collect::<Vec<_>>(),
                    self.log.join("\n")
                );
            }
            assert!(
                counting <= image.wanted.max(1) as usize || healthy < image.wanted as usize,
                "image {} keeps copies above its policy",
                image.id
            );
        }
        assert!(
            plan(&self.state(&HashMap::new())).actions.is_empty(),
            "the planner still has work after settling\n{}",
            self.log.join("\n")
        );
    }
}

fn describe(action: &Action) -> String {
    match action {
        Action::Verify { image, disk } => format!("verify {} on {}", image.id, disk.id),
        Action::Remove {
            image, disk, why, ..
        } => format!("remove {} on {} ({why})", image.id, disk.id),
        Action::Create {
            image,
            target,
            source,
        } => format!("create {} on {} from {source:?}", image.id, target.id),
    }
}

fn disk_row(d: &Disk) -> DiskRow {
    DiskRow {
        id: d.id,
        name: format!("d{}", d.id),
        path: PathBuf::from(format!("/disks/d{}", d.id)),
        uuid: format!("disk-{}", d.id),
        added: 0,
        state: d.state,
        failed_by: (d.state == DiskState::Failed).then_some(FailedBy::Operator),
        reason: None,
        state_since: None,
    }
}

fn image_row(i: &Image) -> ImageRow {
    ImageRow {
        id: i.id,
        name: format!("i{}", i.id),
        uuid: format!("image-{}", i.id),
        size: i.size,
        sha512: None,
        real_size: i.size,
        state: ImageState::Ready,
        copies_wanted: i.wanted,
        source: None,
        created: 0,
        unreferenced_since: None,
        chunk_size: 0,
        digests_hash: String::new(),
        problem: None,
    }
}

#[test]
fn random_faults_never_cost_the_last_good_copy_and_repair_converges() {
    let seeds: u64 = std::env::var("IMGPOOL_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for seed in 1..=seeds {
        let mut model = Model::new(seed);
        model.log.push(format!("seed {seed}"));
        for _ in 0..60 {
            let served = model.serving_images();
            let may_lose_service = model.step();
            model.check(&served, may_lose_service);
        }
        model.settle();
    }
}
