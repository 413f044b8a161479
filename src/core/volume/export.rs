//! A volume's content, now or at a snapshot, as a source an image is made from (`image add
//! --from-volume`): its data extents come from the index and the base image's digests, in one
//! pass, never by reading zeros or probing layer by layer.

use std::io;
use std::sync::Arc;

use super::{index_error, Base, Snapshot, SnapshotReader, Volume, GRANULE};
use crate::format::sparse::SparseSource;

pub struct VolumeSource<'a> {
    volume: &'a Arc<Volume>,
    /// Open for reading: nobody deletes it meanwhile.
    snapshot: Option<SnapshotReader>,
}

impl<'a> VolumeSource<'a> {
    /// The volume at `snapshot`, or as it is now (the caller holds its writer lock, so that it
    /// does not change while it is read).
    pub fn new(
        volume: &'a Arc<Volume>,
        snapshot: Option<&Snapshot>,
    ) -> io::Result<VolumeSource<'a>> {
        let snapshot = snapshot
            .map(|s| volume.open_snapshot(s.epoch))
            .transpose()?;
        Ok(VolumeSource { volume, snapshot })
    }

    pub fn size(&self) -> u64 {
        match &self.snapshot {
            Some(s) => s.snapshot().size,
            None => self.volume.size(),
        }
    }
}

/// A volume's base image as a source of its own: its data extents as its `seek` finds them
/// (what computing its SHA-512 after the import reads).
pub struct BaseSource<'a>(pub &'a dyn Base);

impl SparseSource for BaseSource<'_> {
    fn data_extents(&self, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let base = self.0;
        let end = end.min(base.size());
        let mut extents = Vec::new();
        let mut pos = 0;
        while pos < end {
            let Some(data) = base.seek(pos, false)?.filter(|&d| d < end) else {
                break;
            };
            let hole = base.seek(data, true)?.unwrap_or(end).min(end);
            if hole <= data {
                break;
            }
            extents.push((data, hole));
            pos = hole;
        }
        Ok(extents)
    }

    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = buf.len().min(self.0.size().saturating_sub(offset) as usize);
        self.0.read_at(&mut buf[..n], offset)?;
        Ok(n)
    }
}

/// The union of two sorted lists of disjoint ranges, sorted and disjoint, touching ones merged.
fn union(a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut all = a;
    all.extend(b);
    all.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (start, end) in all {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

impl SparseSource for VolumeSource<'_> {
    /// Granules the volume wrote or discarded (whole: a discarded block reads as zeros, which
    /// the copy does not write), and the base image's data: a superset of the data, which is
    /// what the copy needs.
    fn data_extents(&self, size: u64) -> io::Result<Vec<(u64, u64)>> {
        let size = size.min(self.size());
        let granules = {
            let state = self.volume.state.lock();
            state.usable()?;
            state
                .index
                .granules_seen(self.snapshot.as_ref().map(|s| s.snapshot().epoch))
                .map_err(index_error)?
        };
        let written = granules
            .into_iter()
            .map(|g| (g * GRANULE, ((g + 1) * GRANULE).min(size)))
            .filter(|(start, end)| start < end)
            .collect();
        let base = BaseSource(&*self.volume.base).data_extents(size)?;
        Ok(union(written, base))
    }

    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &self.snapshot {
            Some(s) => s.read_at(buf, offset),
            None => self.volume.read_at(buf, offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_union_of_ranges_merges_what_overlaps_or_touches() {
        assert_eq!(
            union(vec![(0, 10), (20, 30)], vec![(5, 12), (30, 40), (50, 60)]),
            vec![(0, 12), (20, 40), (50, 60)]
        );
        assert_eq!(union(Vec::new(), vec![(1, 2)]), vec![(1, 2)]);
    }
}
