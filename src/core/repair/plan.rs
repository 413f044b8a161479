//! The repair planner: a pure function from a snapshot of the pool (`PoolState`) to the next
//! round of work (`Plan`). Everything it needs from the disks (labels, free space, the images'
//! source files) is read into the snapshot first, by `PoolState::gather`; the executor then runs
//! each action with the checks of `core::copies` inside the store's transactions, so a plan made
//! from a snapshot that went stale can only do less, never remove what it must not.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::core::copies::CopyView;
use crate::core::placement::{self, Candidate};
use crate::core::store::{CopyRow, CopyState, DiskRow, DiskState, ImageRow};

/// A disk as the planner sees it.
#[derive(Debug, Clone)]
pub struct DiskView {
    pub row: DiskRow,
    /// It carries its label now (a disk whose filesystem is not mounted does not).
    pub reachable: bool,
    /// The filesystem's device and capacity, and its free space read for this round; `None` when
    /// they could not be read (such a disk takes no new copy).
    pub space: Option<Space>,
    /// Its filesystem is mounted read-only now: its copies serve and are verified, but it takes
    /// no new copy and none of its copies is deleted (the deletion would fail round after round).
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub device: u64,
    pub capacity: u64,
    pub free: u64,
}

/// The file an image was imported from, as far as re-importing it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFile {
    /// Still there with the image's size: a candidate (its content is checked while copying).
    Usable(PathBuf),
    /// Why it cannot be used, for the operator.
    Unusable(String),
}

/// An image with its copies.
#[derive(Debug, Clone)]
pub struct ImageView {
    pub row: ImageRow,
    pub copies: Vec<CopyRow>,
    pub source: SourceFile,
}

/// The snapshot a round is planned from.
#[derive(Debug, Clone, Default)]
pub struct PoolState {
    pub disks: Vec<DiskView>,
    /// The ready images.
    pub images: Vec<ImageView>,
    /// Disks that failed a copy of an image earlier in this repair (full, say), by image id:
    /// not chosen again for it.
    pub refused: HashMap<i64, Vec<i64>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read the whole copy and check it; it serves only if it matches.
    Verify { image: ImageRow, disk: DiskRow },
    /// Deleted only if `keep` good copies remain without it (evicting disks' copies counting
    /// with `count_evicting`), checked again in the transaction that marks it.
    Remove {
        image: ImageRow,
        disk: DiskRow,
        why: &'static str,
        keep: u32,
        count_evicting: bool,
    },
    Create {
        image: ImageRow,
        target: DiskRow,
        source: Source,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A good copy on this disk.
    Copy(DiskRow),
    /// The file the image was imported from, to be checked against the image's checksums.
    File(PathBuf),
}

/// The next round of work, and per image why it cannot be restored (`None`: it can, or is).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub problems: Vec<(i64, Option<String>)>,
}

impl PoolState {
    fn disk(&self, id: i64) -> Option<&DiskView> {
        self.disks.iter().find(|d| d.row.id == id)
    }

    /// Whether files on the disk can be deleted now.
    fn writable(&self, id: i64) -> bool {
        self.disk(id).is_some_and(|d| !d.read_only)
    }

    /// The rule's view of a copy: its state, its disk's state now, whether the disk is reachable.
    pub fn view(&self, copy: &CopyRow) -> CopyView {
        let disk = self.disk(copy.disk.id);
        CopyView {
            state: copy.state,
            disk: disk.map_or(DiskState::Failed, |d| d.row.state),
            reachable: disk.is_some_and(|d| d.reachable),
        }
    }
}

/// Plans one round. Verifications of untrusted copies, removals of failed copies once a good
/// one exists, new copies for images below their policy (from a good copy, else from the
/// image's source file), and, for images at their policy, removal of copies on evicting disks,
/// of damaged copies, and of copies above the policy.
pub fn plan(state: &PoolState) -> Plan {
    let mut plan = Plan::default();
    // Free space left per filesystem as this round's new copies are charged against it.
    let mut free: HashMap<u64, u64> = HashMap::new();
    for disk in &state.disks {
        if let Some(space) = disk.space {
            free.entry(space.device).or_insert(space.free);
        }
    }
    for image in &state.images {
        let problem = plan_image(state, image, &mut free, &mut plan.actions);
        plan.problems.push((image.row.id, problem));
    }
    plan
}

fn plan_image(
    state: &PoolState,
    image: &ImageView,
    free: &mut HashMap<u64, u64>,
    actions: &mut Vec<Action>,
) -> Option<String> {
    let row = &image.row;
    let views: Vec<(&CopyRow, CopyView)> =
        image.copies.iter().map(|c| (c, state.view(c))).collect();
    let serving = views.iter().filter(|(_, v)| v.serves()).count();
    let good: Vec<&CopyRow> = views
        .iter()
        .filter(|(_, v)| v.is_good())
        .map(|(c, _)| *c)
        .collect();
    let counting = views.iter().filter(|(_, v)| v.counts()).count() as u32;
    let copying = views
        .iter()
        .filter(|(c, _)| c.state == CopyState::Copying)
        .count() as u32;
    let mut to_verify = 0;
    for (copy, view) in &views {
        match copy.state {
            CopyState::Unverified if view.reachable && view.disk != DiskState::Failed => {
                to_verify += 1;
                actions.push(Action::Verify {
                    image: row.clone(),
                    disk: copy.disk.clone(),
                });
            }
            // Once a good copy exists, a failed or damaged copy is of no use (no source, not
            // counted) and its disk may be wanted for a good one.
            CopyState::Failed | CopyState::Damaged
                if view.reachable && !good.is_empty() && state.writable(copy.disk.id) =>
            {
                actions.push(Action::Remove {
                    image: row.clone(),
                    disk: copy.disk.clone(),
                    why: if copy.state == CopyState::Failed {
                        "failed"
                    } else {
                        "damaged, and replaced"
                    },
                    keep: 1,
                    count_evicting: true,
                })
            }
            _ => {}
        }
    }
    let wanted = row.copies_wanted;
    if counting + copying < wanted {
        let missing = wanted - counting - copying;
        let source = match good.first() {
            Some(copy) => Source::Copy(copy.disk.clone()),
            // An unverified copy may turn out good: wait for its verdict.
            None if to_verify > 0 => return None,
            None => match &image.source {
                SourceFile::Usable(path) => Source::File(path.clone()),
                SourceFile::Unusable(why) => return Some(no_good_copy(row, &views, why)),
            },
        };
        // From the source file, one copy first; the others are made from it.
        let count = if matches!(source, Source::File(_)) {
            1
        } else {
            missing
        };
        let mut exclude: Vec<i64> = image.copies.iter().map(|c| c.disk.id).collect();
        exclude.extend(state.refused.get(&row.id).into_iter().flatten());
        let needed = row.real_size.max(1);
        match place(state, free, needed, count, &exclude) {
            Ok(targets) => {
                for target in targets {
                    actions.push(Action::Create {
                        image: row.clone(),
                        target,
                        source: source.clone(),
                    });
                }
                None
            }
            Err(why) => {
                // With no good copy, a disk that holds a failed copy, or a damaged one while
                // another damaged copy still serves, is made free for the new copy: the
                // image's last serving copy is never given up for one that may not come.
                let in_the_way = views
                    .iter()
                    .filter(|(c, v)| {
                        v.reachable && v.disk == DiskState::Healthy && c.state == CopyState::Failed
                    })
                    .chain(views.iter().filter(|(c, v)| {
                        serving > 1 && v.serves() && c.state == CopyState::Damaged
                    }))
                    .map(|(c, _)| *c)
                    .find(|c| state.writable(c.disk.id));
                match (good.is_empty(), in_the_way) {
                    (true, Some(copy)) => {
                        actions.push(Action::Remove {
                            image: row.clone(),
                            disk: copy.disk.clone(),
                            why: "unusable, and its disk is wanted for a new copy",
                            keep: 0,
                            count_evicting: true,
                        });
                        None
                    }
                    _ => Some(format!(
                        "'{}' has {counting} of {wanted} healthy copies and no disk can take another: not enough room for '{}' ({needed} bytes, {count} copies): {why}; free space or add a disk with `imgpool disk add`",
                        row.name, row.name
                    )),
                }
            }
        }
    } else {
        if copying > 0 {
            return None;
        }
        // Policy met: copies on evicting disks go, then copies above the policy.
        for (copy, view) in &views {
            if view.is_good() && !view.counts() && state.writable(copy.disk.id) {
                actions.push(Action::Remove {
                    image: row.clone(),
                    disk: copy.disk.clone(),
                    why: "evicted",
                    keep: wanted,
                    count_evicting: false,
                });
            }
        }
        let surplus = counting - wanted;
        if surplus > 0 {
            let mut extra: Vec<&CopyRow> = views
                .iter()
                .filter(|(c, v)| v.counts() && state.writable(c.disk.id))
                .map(|(c, _)| *c)
                .collect();
            // The disks with the least room give up their copies first.
            extra.sort_by_key(|c| {
                state
                    .disk(c.disk.id)
                    .and_then(|d| d.space)
                    .map_or(0, |s| s.free)
            });
            for copy in extra.into_iter().take(surplus as usize) {
                actions.push(Action::Remove {
                    image: row.clone(),
                    disk: copy.disk.clone(),
                    why: "above the copy policy",
                    keep: wanted,
                    count_evicting: false,
                });
            }
        }
        None
    }
}

/// Chooses disks for `count` new copies among the healthy, reachable disks not in `exclude`,
/// charging the copies against `free`.
fn place(
    state: &PoolState,
    free: &mut HashMap<u64, u64>,
    needed: u64,
    count: u32,
    exclude: &[i64],
) -> Result<Vec<DiskRow>, String> {
    let candidates: Vec<Candidate> = state
        .disks
        .iter()
        .filter(|d| {
            d.row.state == DiskState::Healthy
                && d.reachable
                && !d.read_only
                && !exclude.contains(&d.row.id)
        })
        .filter_map(|d| {
            let space = d.space?;
            Some(Candidate {
                disk_id: d.row.id,
                name: d.row.name.clone(),
                device: space.device,
                capacity: space.capacity,
                free: free.get(&space.device).copied().unwrap_or(space.free),
            })
        })
        .collect();
    let chosen = placement::choose(&candidates, needed, count)?;
    Ok(chosen
        .into_iter()
        .filter_map(|id| {
            let disk = state.disk(id)?;
            if let Some(left) = disk.space.and_then(|s| free.get_mut(&s.device)) {
                *left = left.saturating_sub(needed);
            }
            Some(disk.row.clone())
        })
        .collect())
}

/// What to tell the operator about an image with no good copy to copy from: only a damaged one
/// (the chunks that do not match fail); none, but a copy on a disk out of service that may
/// come back; or none at all, every copy lost on a disk in service (its file deleted, or
/// found bad), where only a new import brings the image back.
fn no_good_copy(image: &ImageRow, views: &[(&CopyRow, CopyView)], why: &str) -> String {
    let name = &image.name;
    if views.iter().any(|(_, v)| v.serves()) {
        return format!(
            "the only copy of '{name}' is damaged and {why}: its damaged chunks return EIO, the others are served; `imgpool scrub {name}` checks it again, or import the image again"
        );
    }
    let away = views.iter().any(|(c, v)| {
        c.state != CopyState::Removing && (!v.reachable || v.disk == DiskState::Failed)
    });
    let lost: Vec<String> = views
        .iter()
        .filter(|(c, _)| c.state == CopyState::Failed)
        .map(|(c, _)| match &c.reason {
            Some(reason) => format!("its copy on '{}' failed: {reason}", c.disk.name),
            None => format!("its copy on '{}' failed", c.disk.name),
        })
        .collect();
    if away || lost.is_empty() {
        format!(
            "no healthy copy of '{name}' is left and {why}: its reads return EIO; bring back a disk that held a copy (it is verified first) or import the image again"
        )
    } else {
        format!(
            "no healthy copy of '{name}' is left ({}) and {why}: its reads return EIO; import it again: `imgpool image rm {name}`, then `imgpool image add {name} FILE`",
            lost.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::{FailedBy, ImageState};

    fn disk(id: i64, read_only: bool) -> DiskView {
        DiskView {
            row: DiskRow {
                id,
                name: format!("d{id}"),
                path: PathBuf::from(format!("/disks/d{id}")),
                uuid: format!("disk-{id}"),
                added: 0,
                state: DiskState::Healthy,
                failed_by: None::<FailedBy>,
                reason: None,
                state_since: None,
            },
            reachable: true,
            space: Some(Space {
                device: id as u64,
                capacity: 1 << 30,
                free: 1 << 30,
            }),
            read_only,
        }
    }

    fn image(wanted: u32, copies: &[(&DiskView, CopyState, Option<&str>)]) -> ImageView {
        ImageView {
            row: ImageRow {
                id: 1,
                name: "img".into(),
                uuid: "image-1".into(),
                size: 4096,
                sha512: None,
                real_size: 4096,
                state: ImageState::Ready,
                copies_wanted: wanted,
                source: None,
                created: 0,
                unreferenced_since: None,
                chunk_size: 0,
                digests_hash: String::new(),
                problem: None,
            },
            copies: copies
                .iter()
                .map(|(d, state, reason)| CopyRow {
                    image_id: 1,
                    disk: d.row.clone(),
                    state: *state,
                    reason: reason.map(str::to_string),
                    since: 0,
                })
                .collect(),
            source: SourceFile::Unusable("its source is gone".into()),
        }
    }

    #[test]
    fn a_read_only_disk_takes_no_copy_and_loses_none() {
        let (ro, rw) = (disk(1, true), disk(2, false));
        // One copy wanted more: the read-only disk has room, but takes none.
        let state = PoolState {
            images: vec![image(2, &[(&rw, CopyState::Ready, None)])],
            disks: vec![ro.clone(), rw.clone()],
            refused: HashMap::new(),
        };
        let planned = plan(&state);
        assert!(planned.actions.is_empty(), "{:?}", planned.actions);
        assert!(planned.problems[0].1.is_some(), "{:?}", planned.problems);
        // A failed copy on the read-only disk: it cannot be deleted there.
        let state = PoolState {
            images: vec![image(
                2,
                &[
                    (&rw, CopyState::Ready, None),
                    (&ro, CopyState::Failed, Some("bad")),
                ],
            )],
            disks: vec![ro.clone(), rw.clone()],
            refused: HashMap::new(),
        };
        let planned = plan(&state);
        assert!(planned.actions.is_empty(), "{:?}", planned.actions);
        assert!(
            planned.problems[0]
                .1
                .as_deref()
                .unwrap()
                .contains("no disk can take"),
            "{:?}",
            planned.problems
        );

        // Above the policy: the copy on the read-only disk stays, the writable one goes.
        let state = PoolState {
            images: vec![image(
                1,
                &[(&ro, CopyState::Ready, None), (&rw, CopyState::Ready, None)],
            )],
            disks: vec![ro, rw],
            refused: HashMap::new(),
        };
        match &plan(&state).actions[..] {
            [Action::Remove { disk, .. }] => assert_eq!(disk.name, "d2"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_image_whose_copies_were_deleted_is_advised_a_new_import() {
        let d1 = disk(1, false);
        let state = PoolState {
            images: vec![image(
                1,
                &[(&d1, CopyState::Failed, Some("its file /x is missing"))],
            )],
            disks: vec![d1],
            refused: HashMap::new(),
        };
        let planned = plan(&state);
        let problem = planned.problems[0].1.clone().unwrap();
        assert!(problem.contains("its file /x is missing"), "{problem}");
        assert!(problem.contains("imgpool image add img"), "{problem}");
        assert!(!problem.contains("free space"), "{problem}");
    }
}
