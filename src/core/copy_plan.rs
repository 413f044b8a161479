//! The plan of `imgpool copy`: from the snapshots of both sides (by guid, oldest first), whether
//! the copy is whole or a refresh, which target snapshots it discards and which streams
//! (`send ... | recv ...`) carry it. Pure: the CLI reads the snapshot lists, runs the packages
//! and prints the plan; the rules are here, where they are tested without processes.
//!
//! A copy is at most two packages, each atomic on the receiving side: the snapshots
//! (`send V@NEWEST --from-all`, or `--from COMMON --from-all` for a refresh), then the current
//! state (`send V --from NEWEST`: `send` takes its own temporary snapshot, which the target
//! does not keep). Between the two the target is at the source's newest snapshot, a state it
//! is allowed to stay in when the second package is cut.

use crate::core::pool::TEMPORARY_SNAPSHOT_PREFIXES;

/// One snapshot as `snapshot list --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    pub guid: String,
}

/// Whether `name` is one the pool gives its temporary snapshots (a send's of the live volume,
/// a receive's staged ones, an export's).
pub fn is_temporary(name: &str) -> bool {
    TEMPORARY_SNAPSHOT_PREFIXES
        .iter()
        .any(|p| name.starts_with(p))
}

/// The source snapshots a copy sends: the pool's temporary ones left out (one may be there
/// while such a command runs, or until the next start after it died), which `send` leaves out
/// of its packages too. The target's stay in its list: a `recv --force` discards those after
/// the common snapshot (all of them, for a replacement) like any other, so the plan lists
/// them.
fn lasting(snapshots: Vec<Snapshot>) -> Vec<Snapshot> {
    snapshots
        .into_iter()
        .filter(|s| !is_temporary(&s.name))
        .collect()
}

/// One stream: `send VOLUME[@to] [--from from] [--from-all]` piped to `recv TARGET [--force]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// The snapshot it sends up to; `None`: the volume as it is now (through `send`'s temporary
    /// snapshot).
    pub to: Option<String>,
    /// The source snapshot it is incremental from; `None`: whole.
    pub from: Option<String>,
    /// Every snapshot after `from` (or from the first) up to `to`, each kept on the target.
    pub from_all: bool,
    /// `recv --force`: the target is rolled back to `from` first, or, for a whole stream,
    /// replaced by the stream's volume (what the plan discards).
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The target does not exist: every snapshot, then the current state.
    Full,
    /// The target has `common` (source name), the newest source snapshot it has.
    Refresh { common: String },
    /// The target exists (`--refresh`) but has none of the source's snapshots: a full copy
    /// whose first package replaces it (`recv --force` of a whole stream, which swaps the new
    /// volume in only once it has arrived whole: a cut leaves the target as it was).
    Replace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub kind: Kind,
    /// Target snapshots (target names) deleted: those newer than the common one (a refresh),
    /// or all of them (a replacement).
    pub discard: Vec<String>,
    /// Source snapshots that the target gets, oldest first.
    pub send: Vec<String>,
    /// The streams, in order.
    pub packages: Vec<Package>,
}

/// Why there is no plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The target exists and `--refresh` was not given.
    TargetExists,
}

/// The plan for copying a volume with snapshots `source` onto a target that has `target`
/// (`None`: no such volume), both oldest first and as listed: the source's temporary
/// snapshots are left out (`lasting`), the target's are planned with.
pub fn plan(
    source: &[Snapshot],
    target: Option<&[Snapshot]>,
    refresh: bool,
) -> Result<Plan, Refusal> {
    let source = &lasting(source.to_vec())[..];
    let Some(target) = target else {
        return Ok(full(source));
    };
    if !refresh {
        return Err(Refusal::TargetExists);
    }
    // The newest source snapshot the target has, by guid (names may differ, and the same name
    // may stand for another snapshot).
    let common = source
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, s)| Some((i, target.iter().position(|t| t.guid == s.guid)?)));
    let Some((in_source, in_target)) = common else {
        return Ok(replace(source, target));
    };
    let common = source[in_source].name.clone();
    let send: Vec<String> = source[in_source + 1..]
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let discard = target[in_target + 1..]
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let mut packages = Vec::new();
    let newest = match send.last() {
        Some(newest) => {
            packages.push(Package {
                to: Some(newest.clone()),
                from: Some(common.clone()),
                from_all: true,
                force: true,
            });
            newest.clone()
        }
        None => common.clone(),
    };
    packages.push(Package {
        to: None,
        from: Some(newest),
        // After the snapshots' package the target is exactly at NEWEST: a change there since
        // is someone else's, which `recv` then refuses rather than discards.
        force: send.is_empty(),
        from_all: false,
    });
    Ok(Plan {
        kind: Kind::Refresh { common },
        discard,
        send,
        packages,
    })
}

fn full(source: &[Snapshot]) -> Plan {
    let send: Vec<String> = source.iter().map(|s| s.name.clone()).collect();
    let packages = match send.last() {
        Some(newest) => vec![
            Package {
                to: Some(newest.clone()),
                from: None,
                from_all: true,
                force: false,
            },
            Package {
                to: None,
                from: Some(newest.clone()),
                from_all: false,
                force: false,
            },
        ],
        None => vec![Package {
            to: None,
            from: None,
            from_all: false,
            force: false,
        }],
    };
    Plan {
        kind: Kind::Full,
        discard: Vec::new(),
        send,
        packages,
    }
}

/// A full copy onto an existing target with nothing in common: its first package replaces
/// the target, every snapshot of which is listed as discarded.
fn replace(source: &[Snapshot], target: &[Snapshot]) -> Plan {
    let mut plan = full(source);
    plan.kind = Kind::Replace;
    plan.discard = target.iter().map(|t| t.name.clone()).collect();
    plan.packages[0].force = true;
    plan
}

#[cfg(test)]
mod tests {
    //! Random histories on both sides (a shared past, then each side's own snapshots and
    //! deletions), planned, then the packages applied to a model of the target by the rules
    //! `recv` enforces. Checked against a reference written the plain way (every pair of
    //! snapshots), and by what the target holds afterwards.
    use super::*;
    use std::collections::HashSet;

    use crate::core::test_rng::Rng;

    fn snap(name: &str, guid: u64) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid: format!("g{guid}"),
        }
    }

    /// The target as `recv` sees it: its snapshots (name, guid) and whether its live content
    /// is its newest snapshot's.
    #[derive(Clone, Debug)]
    struct Target {
        snapshots: Vec<Snapshot>,
        live_is_newest: bool,
    }

    /// What `recv` does with one package, by the contract in docs/send-receive.md; `Err` is a
    /// refusal (the test fails on one: the plan must never send what `recv` refuses).
    fn receive(
        target: Option<Target>,
        package: &Package,
        source: &[Snapshot],
    ) -> Result<Target, String> {
        let by_name = |name: &str| source.iter().position(|s| s.name == name).unwrap();
        let end = package.to.as_deref().map(by_name);
        let start = package.from.as_deref().map(by_name);
        let mut target = match (target, start) {
            (None, None) => Target {
                snapshots: Vec::new(),
                live_is_newest: true,
            },
            (None, Some(_)) => return Err("an incremental stream into no volume".into()),
            // `recv --force` replaces the volume with the stream's.
            (Some(_), None) if package.force => Target {
                snapshots: Vec::new(),
                live_is_newest: true,
            },
            (Some(_), None) => return Err("a whole stream onto an existing volume".into()),
            (Some(mut t), Some(from)) => {
                let guid = &source[from].guid;
                let at = t
                    .snapshots
                    .iter()
                    .position(|s| &s.guid == guid)
                    .ok_or("the target lacks the stream's base")?;
                let newer = at + 1 < t.snapshots.len();
                if (newer || !t.live_is_newest) && !package.force {
                    return Err(format!("diverged target without --force: {package:?}"));
                }
                t.snapshots.truncate(at + 1);
                t
            }
        };
        match (package.from_all, end) {
            (true, Some(end)) => {
                let first = start.map_or(0, |from| from + 1);
                target.snapshots.extend(source[first..=end].iter().cloned());
            }
            (true, None) => return Err("--from-all without a snapshot to end at".into()),
            (false, Some(end)) => target.snapshots.push(source[end].clone()),
            // The live state alone: through a temporary snapshot the target does not keep.
            (false, None) => {}
        }
        // A package ending at the live state leaves the target's live content the source's,
        // which no snapshot of the target holds.
        target.live_is_newest = package.to.is_some();
        Ok(target)
    }

    /// The reference: the common snapshot is the pair (source i, target j) with equal guids and
    /// the greatest i, found by looking at every pair.
    fn reference_common(source: &[Snapshot], target: &[Snapshot]) -> Option<(usize, usize)> {
        let mut best = None;
        for (i, s) in source.iter().enumerate() {
            for (j, t) in target.iter().enumerate() {
                if s.guid == t.guid {
                    best = Some((i, j));
                }
            }
        }
        best
    }

    /// A random pair of histories: a shared past of snapshots, then each side's own, with some
    /// snapshots deleted on each side, and sometimes no target at all.
    fn histories(rng: &mut Rng) -> (Vec<Snapshot>, Option<Vec<Snapshot>>) {
        let mut guid = 0;
        let mut fresh = |prefix: &str, rng: &mut Rng| {
            guid += 1;
            // Names repeat across sides on purpose: only guids identify.
            snap(&format!("{prefix}{}", rng.below(6)), guid)
        };
        let shared: Vec<Snapshot> = (0..rng.below(5)).map(|_| fresh("s", rng)).collect();
        let mut source = shared.clone();
        source.extend((0..rng.below(4)).map(|_| fresh("s", rng)));
        let mut target = shared;
        target.extend((0..rng.below(3)).map(|_| fresh("s", rng)));
        let thin = |list: &mut Vec<Snapshot>, rng: &mut Rng| {
            if rng.below(3) == 0 {
                list.retain(|_| rng.below(3) != 0);
            }
        };
        thin(&mut source, rng);
        thin(&mut target, rng);
        // Names are unique within a volume.
        let unique = |list: &mut Vec<Snapshot>| {
            let mut seen = HashSet::new();
            list.retain(|s| seen.insert(s.name.clone()));
        };
        unique(&mut source);
        unique(&mut target);
        let target = (rng.below(4) != 0).then_some(target);
        (source, target)
    }

    #[test]
    fn random_histories_plan_like_the_reference_and_leave_the_target_equal_to_the_source() {
        let mut seen = HashSet::new();
        for seed in 1..20_000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (source, target) = histories(&mut rng);
            let refresh = rng.below(4) != 0;
            let planned = plan(&source, target.as_deref(), refresh);
            let case =
                format!("seed {seed}: source {source:?}, target {target:?}, refresh {refresh}");
            let Some(old) = target else {
                let p = planned.unwrap_or_else(|e| panic!("{case}: refused {e:?}"));
                assert_eq!(p.kind, Kind::Full, "{case}");
                assert!(p.discard.is_empty(), "{case}");
                let mut model = None;
                for package in &p.packages {
                    model = Some(receive(model, package, &source).expect(&case));
                }
                let model = model.expect(&case);
                assert_eq!(model.snapshots, source, "{case}");
                assert!(!model.live_is_newest, "{case}: the live state was not sent");
                seen.insert("full");
                continue;
            };
            if !refresh {
                assert_eq!(planned, Err(Refusal::TargetExists), "{case}");
                seen.insert("exists");
                continue;
            }
            let Some((i, j)) = reference_common(&source, &old) else {
                let p = planned.unwrap_or_else(|e| panic!("{case}: refused {e:?}"));
                assert_eq!(p.kind, Kind::Replace, "{case}");
                // Every snapshot of the target goes, and is listed.
                let all: Vec<String> = old.iter().map(|s| s.name.clone()).collect();
                assert_eq!(p.discard, all, "{case}");
                let mut model = Target {
                    snapshots: old.clone(),
                    live_is_newest: rng.below(2) == 0,
                };
                for package in &p.packages {
                    model = receive(Some(model), package, &source).expect(&case);
                }
                assert_eq!(model.snapshots, source, "{case}");
                assert!(!model.live_is_newest, "{case}: the live state was not sent");
                assert!(p.packages.iter().skip(1).all(|p| !p.force), "{case}");
                seen.insert("replace");
                continue;
            };
            let p = planned.unwrap_or_else(|e| panic!("{case}: refused {e:?}"));
            assert_eq!(
                p.kind,
                Kind::Refresh {
                    common: source[i].name.clone()
                },
                "{case}"
            );
            let discard: Vec<String> = old[j + 1..].iter().map(|s| s.name.clone()).collect();
            assert_eq!(p.discard, discard, "{case}");
            let send: Vec<String> = source[i + 1..].iter().map(|s| s.name.clone()).collect();
            assert_eq!(p.send, send, "{case}");
            // Applied package by package, as a cut between them leaves it too.
            let mut model = Target {
                snapshots: old.clone(),
                // The target's live state: anything (a refresh must cope with writes since).
                live_is_newest: rng.below(2) == 0,
            };
            for (n, package) in p.packages.iter().enumerate() {
                model = receive(Some(model), package, &source).expect(&case);
                // Whatever the target kept of its own, it kept up to the common snapshot.
                assert_eq!(
                    model.snapshots[..=j],
                    old[..=j],
                    "{case}: after package {n}"
                );
            }
            let mut expected = old[..=j].to_vec();
            expected.extend(source[i + 1..].iter().cloned());
            assert_eq!(model.snapshots, expected, "{case}");
            assert!(!model.live_is_newest, "{case}: the live state was not sent");
            // Only the first package may discard: the second goes onto what the first made.
            assert!(p.packages.iter().skip(1).all(|p| !p.force), "{case}");
            seen.insert(if discard.is_empty() {
                "refresh"
            } else {
                "refresh discarding"
            });
        }
        // The generator reached every kind of case.
        assert_eq!(seen.len(), 5, "{seen:?}");
    }

    #[test]
    fn a_refresh_with_nothing_new_sends_only_the_live_state_onto_the_rolled_back_target() {
        let source = [snap("a", 1), snap("b", 2)];
        let target = [snap("a", 1), snap("b", 2), snap("mine", 9)];
        let p = plan(&source, Some(&target), true).unwrap();
        assert_eq!(p.kind, Kind::Refresh { common: "b".into() });
        assert_eq!(p.discard, ["mine"]);
        assert!(p.send.is_empty());
        assert_eq!(
            p.packages,
            [Package {
                to: None,
                from: Some("b".into()),
                from_all: false,
                force: true
            }]
        );
    }

    #[test]
    fn a_source_without_snapshots_goes_whole_in_one_package() {
        let p = plan(&[], None, false).unwrap();
        assert_eq!(p.kind, Kind::Full);
        assert_eq!(
            p.packages,
            [Package {
                to: None,
                from: None,
                from_all: false,
                force: false
            }]
        );
        // And with a target, there is nothing to refresh from: the live state replaces it.
        let p = plan(&[], Some(&[snap("mine", 9)]), true).unwrap();
        assert_eq!(p.kind, Kind::Replace);
        assert_eq!(p.discard, ["mine"]);
        assert_eq!(
            p.packages,
            [Package {
                to: None,
                from: None,
                from_all: false,
                force: true
            }]
        );
    }

    #[test]
    fn temporary_snapshots_of_other_commands_are_not_planned_with() {
        let listed = vec![
            snap("a", 1),
            snap("copy-tmp-x", 2),
            snap("recv-tmp-p-0", 3),
            snap("export-tmp-y", 4),
            snap("copy-tmpfs", 5),
        ];
        assert_eq!(lasting(listed), [snap("a", 1), snap("copy-tmpfs", 5)]);
    }

    /// A target's temporary snapshots (a send's or an export's there, or a leftover of one
    /// that died) go with a replacement, and with a refresh when newer than the common one:
    /// the plan lists them, as `recv --force` reports them. The source's are sent by no
    /// package.
    #[test]
    fn the_targets_temporary_snapshots_are_listed_among_what_goes() {
        let source = [snap("a", 1), snap("copy-tmp-s", 2)];
        let target = [snap("mine", 8), snap("copy-tmp-x", 9)];
        let p = plan(&source, Some(&target), true).unwrap();
        assert_eq!(p.kind, Kind::Replace);
        assert_eq!(p.discard, ["mine", "copy-tmp-x"]);
        assert_eq!(p.send, ["a"]);
        let target = [snap("a", 1), snap("export-tmp-y", 9)];
        let p = plan(&source, Some(&target), true).unwrap();
        assert_eq!(p.kind, Kind::Refresh { common: "a".into() });
        assert_eq!(p.discard, ["export-tmp-y"]);
    }

    #[test]
    fn the_common_snapshot_is_found_by_guid_not_by_name() {
        let source = [snap("a", 1), snap("b", 2)];
        // The target's "b" is another snapshot; its "old" is the source's "a".
        let target = [snap("old", 1), snap("b", 7)];
        let p = plan(&source, Some(&target), true).unwrap();
        assert_eq!(p.kind, Kind::Refresh { common: "a".into() });
        assert_eq!(p.discard, ["b"]);
        assert_eq!(p.send, ["b"]);
    }
}
