//! The records of a send (`docs/send-receive.md`): a package of a volume's snapshots, each
//! whole (against its base image) or as what changed since the snapshot before it, read
//! through readers that keep each snapshot from being deleted while it is read.
//!
//! Which granules a snapshot sends comes from the index alone (a whole one: the granules it
//! wrote or discarded; an incremental one: those whose version it sees was born after the
//! older snapshot), and each of them is compared block by block, old against new: only the
//! 4 KiB blocks that differ cross, so a 4 KiB write after a snapshot (which copies its
//! granule's other blocks into a new version) sends 4 KiB, not 64. The content sum is brought
//! up to date from the same granules, so the digest at each snapshot's end covers its whole
//! content although only what changed was read.
//!
//! Nothing here knows where the readers come from: the pool reads a volume it holds the writer
//! lock of through `SnapshotReader`s, and one a mount daemon has open through that mount's
//! snapshot files; tests read volumes in a temporary directory.

use std::io::{self, Write};

use super::sums::{sum_changes, BaseGranules, ContentSums, GranuleReader};
use super::{index_error, Base, Snapshot, SnapshotListing};
use crate::format::stream::{ContentHash, Header, Record, StreamSnapshot, StreamWriter, MAX_DATA};
use crate::format::volume::{BLOCK, GRANULE};

/// The snapshots (name, guid, created, size) as a stream names them.
pub fn stream_snapshot(snapshot: &Snapshot, temporary: bool) -> StreamSnapshot {
    StreamSnapshot {
        name: snapshot.name.clone(),
        guid: snapshot.guid.clone(),
        created: snapshot.created,
        size: snapshot.size,
        temporary,
    }
}

impl SnapshotListing {
    /// Every snapshot, oldest first.
    pub fn all(&self) -> io::Result<Vec<Snapshot>> {
        self.index.snapshots().map_err(index_error)
    }

    /// Up to `limit` of the granules the volume wrote or discarded as the snapshot at `epoch`
    /// sees them, from `first` on, in order.
    pub fn granules_seen_from(&self, epoch: u64, first: u64, limit: usize) -> io::Result<Vec<u64>> {
        self.index
            .granules_seen_from(epoch, first, limit)
            .map_err(index_error)
    }

    /// The granules that may differ between the snapshots at `after` and at `at`.
    pub fn granules_changed(&self, after: u64, at: u64) -> io::Result<Vec<u64>> {
        self.index.granules_changed(after, at).map_err(index_error)
    }
}

/// The snapshots of a package, oldest first: `to` alone, or with `from_all` every snapshot
/// after `from` (or from the volume's first) up to `to`. `snapshots` is the volume's list,
/// oldest first; `from` must be older than `to` (the caller checked).
pub fn package_snapshots(
    snapshots: &[Snapshot],
    from: Option<&Snapshot>,
    to: &Snapshot,
    from_all: bool,
) -> Vec<Snapshot> {
    if !from_all {
        return vec![to.clone()];
    }
    let after = from.map(|f| f.epoch);
    snapshots
        .iter()
        .filter(|s| after.is_none_or(|a| s.epoch > a) && s.epoch <= to.epoch)
        .cloned()
        .collect()
}

/// Opens a snapshot for reading; while the reader lives nobody can delete the snapshot.
pub type OpenSnapshot<'a> = dyn Fn(&Snapshot) -> io::Result<Box<dyn GranuleReader + 'a>> + 'a;

/// What a send reads.
pub struct SendSource<'a> {
    /// The volume's index, through a connection of the sender's.
    pub listing: &'a SnapshotListing,
    pub open: &'a OpenSnapshot<'a>,
    /// The base image (what a whole snapshot is compared with, and `--with-image`'s data).
    pub base: &'a dyn Base,
    /// The volume's content sums: where an incremental's starting sum is found, and where each
    /// snapshot's is recorded.
    pub sums: &'a ContentSums,
}

/// A package resolved against the volume: its header, and the snapshots the header names as
/// the index has them (epochs included).
pub struct Package {
    pub header: Header,
    pub from: Option<Snapshot>,
    pub snapshots: Vec<Snapshot>,
}

/// Where a send is, for a progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct SendProgress {
    /// 1-based, of `snapshots`; 0 while the base image is sent.
    pub snapshot: usize,
    pub snapshots: usize,
    /// How far through the snapshot (or the image) the send is, in granules (the granules are
    /// sent in ascending order), of `granules` (its size).
    pub granule: u64,
    pub granules: u64,
    /// Stream bytes written so far.
    pub bytes: u64,
}

/// What a send wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// The whole stream, magic and framing included.
    pub bytes: u64,
    /// Bytes in `Data` records, and the bytes `Zero` records cover.
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Bytes in `ImageData` records.
    pub image_bytes: u64,
    /// Snapshots whose records were sent (a resumed stream skips the first ones).
    pub snapshots_sent: usize,
}

/// How often (in granules sent) the progress callback hears of a snapshot's advance.
const PROGRESS_EVERY: usize = 64;

/// The granules of a whole snapshot are listed this many at a time: the list can be the whole
/// volume (8 bytes per granule written: 512 MiB for a 4 TiB volume written throughout).
#[cfg(not(test))]
const GRANULES_PAGE: usize = 65_536;
/// A few in tests, so that whole snapshots span pages (and records span them).
#[cfg(test)]
const GRANULES_PAGE: usize = 7;

/// Writes the stream of `package` to `out`. The first snapshot to send (and the one it is
/// compared with) is opened before the first byte, so that a snapshot already gone fails the
/// send with nothing written; one deleted later (a mount's snapshot can be, between the two
/// the sender holds) fails it with the stream cut short, which the receiver refuses.
pub fn send<W: Write>(
    source: &SendSource,
    package: &Package,
    out: W,
    progress: &mut dyn FnMut(&SendProgress),
) -> io::Result<Sent> {
    let header = &package.header;
    let base_sha512 = header.base_image.as_ref().map(|i| i.sha512.as_str());
    let total = package.snapshots.len();
    let first = header.resume.map_or(0, |r| r.done).min(total);
    let resume_granule = header.resume.map_or(0, |r| r.granule);

    // The snapshot before the first one sent (none: it goes whole), and both readers.
    let mut previous = match first {
        0 => package.from.clone(),
        n => Some(package.snapshots[n - 1].clone()),
    };
    let mut old = previous.as_ref().map(|s| (source.open)(s)).transpose()?;
    let mut new = package
        .snapshots
        .get(first)
        .map(|s| (source.open)(s))
        .transpose()?;
    let mut sum = match (&previous, &old) {
        (Some(snapshot), Some(reader)) => starting_sum(source, snapshot, reader.as_ref())?,
        _ => ContentHash::default(),
    };

    let mut writer = StreamWriter::new(out)?;
    let mut sent = Sent::default();
    writer.write(&Record::Header(header.clone()))?;
    if header.with_image {
        sent.image_bytes = send_image(source.base, header, &mut writer, progress)?;
    }
    for index in first..total {
        let snapshot = &package.snapshots[index];
        let reader = new.take().expect("the snapshot is open");
        let base = BaseGranules(source.base);
        // A snapshot sent or received before has its sum recorded: it is not hashed again.
        // (Its content is immutable; were what is read now to differ from what was summed
        // then, the receiver's check of the digest would catch it.)
        let recorded = source.sums.get(&snapshot.guid)?;
        let mut changes = Changes {
            size: snapshot.size,
            old: match &old {
                Some(o) => o.as_ref(),
                None => &base,
            },
            new: reader.as_ref(),
            skip_below: if index == first { resume_granule } else { 0 },
            sum,
            summing: recorded.is_none(),
            runs: Runs::default(),
            before: vec![0u8; GRANULE as usize],
            after: vec![0u8; GRANULE as usize],
        };
        writer.write(&Record::SnapshotBegin {
            index: index as u32,
            size: snapshot.size,
        })?;
        let mut at = SendProgress {
            snapshot: index + 1,
            snapshots: total,
            granules: snapshot.size.div_ceil(GRANULE),
            ..SendProgress::default()
        };
        for_each_page(source.listing, previous.as_ref(), snapshot, |page| {
            changes.send(&mut writer, &mut sent, page, &mut |granule, bytes| {
                at.granule = granule;
                at.bytes = bytes;
                progress(&at);
            })
        })?;
        sum = changes.finish(&mut writer, &mut sent)?;
        if let Some(recorded) = recorded {
            sum = recorded;
        }
        at.granule = at.granules;
        at.bytes = writer.bytes();
        progress(&at);
        writer.write(&Record::SnapshotEnd {
            index: index as u32,
            digest: sum.digest(snapshot.size, base_sha512),
        })?;
        if recorded.is_none() && !header.snapshots[index].temporary {
            source.sums.put(&snapshot.guid, &sum)?;
        }
        sent.snapshots_sent += 1;
        // The older of the two goes before the next opens: at most two are held.
        drop(old.take());
        old = Some(reader);
        previous = Some(snapshot.clone());
        new = package
            .snapshots
            .get(index + 1)
            .map(|s| (source.open)(s))
            .transpose()?;
    }
    writer.write(&Record::End)?;
    writer.flush()?;
    sent.bytes = writer.bytes();
    Ok(sent)
}

/// The sum of `snapshot`'s content: recorded when it was sent or received, or else computed
/// from its own granules against the base (and recorded).
fn starting_sum(
    source: &SendSource,
    snapshot: &Snapshot,
    reader: &dyn GranuleReader,
) -> io::Result<ContentHash> {
    if let Some(sum) = source.sums.get(&snapshot.guid)? {
        return Ok(sum);
    }
    let mut sum = ContentHash::default();
    for_each_page(source.listing, None, snapshot, |page| {
        sum = sum_changes(sum, page, &BaseGranules(source.base), reader)?;
        Ok(())
    })?;
    source.sums.put(&snapshot.guid, &sum)?;
    Ok(sum)
}

/// The base image's data as `ImageData` records (its holes, as its `seek` knows them, and
/// blocks that read as zeros are left out: they read as zeros on the other side), then
/// `ImageEnd` with its SHA-512. Returns the data bytes sent.
fn send_image<W: Write>(
    base: &dyn Base,
    header: &Header,
    writer: &mut StreamWriter<W>,
    progress: &mut dyn FnMut(&SendProgress),
) -> io::Result<u64> {
    let image = header
        .base_image
        .as_ref()
        .ok_or_else(|| io::Error::other("--with-image: the volume has no base image"))?;
    let sha512: [u8; 64] = hex::decode(&image.sha512)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            io::Error::other(format!(
                "image '{}' has no valid SHA-512 in the store",
                image.name
            ))
        })?;
    let size = base.size();
    let mut buf = vec![0u8; MAX_DATA];
    let mut sent = 0u64;
    let mut pos = 0;
    while pos < size {
        let Some(data) = base.seek(pos, false)?.filter(|&d| d < size) else {
            break;
        };
        let hole = base.seek(data, true)?.unwrap_or(size).clamp(data, size);
        let mut at = data;
        while at < hole {
            let len = (hole - at).min(MAX_DATA as u64) as usize;
            base.read_at(&mut buf[..len], at)?;
            // Runs of blocks that are not all zeros.
            let blocks: Vec<&[u8]> = buf[..len].chunks(BLOCK as usize).collect();
            let mut i = 0;
            while i < blocks.len() {
                if is_zero(blocks[i]) {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < blocks.len() && !is_zero(blocks[i]) {
                    i += 1;
                }
                let data: Vec<u8> = blocks[first..i].concat();
                sent += data.len() as u64;
                writer.write(&Record::ImageData {
                    offset: at + first as u64 * BLOCK,
                    data,
                })?;
            }
            at += len as u64;
            progress(&SendProgress {
                granule: at.div_ceil(GRANULE),
                granules: size.div_ceil(GRANULE),
                bytes: writer.bytes(),
                ..SendProgress::default()
            });
        }
        pos = hole.max(data + 1);
    }
    writer.write(&Record::ImageEnd { sha512 })?;
    Ok(sent)
}

/// Whether a block (at most `BLOCK` bytes) reads as zeros: one `memcmp`.
fn is_zero(block: &[u8]) -> bool {
    const ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    block == &ZEROS[..block.len()]
}

/// The granules one snapshot sends, in ascending order, page by page: a whole snapshot's
/// through the index's primary key, `GRANULES_PAGE` at a time; an incremental one's at once
/// from the `birth` index (as many as changed: never a scan of the volume).
fn for_each_page(
    listing: &SnapshotListing,
    previous: Option<&Snapshot>,
    snapshot: &Snapshot,
    mut each: impl FnMut(&[u64]) -> io::Result<()>,
) -> io::Result<()> {
    if let Some(previous) = previous {
        return each(&listing.granules_changed(previous.epoch, snapshot.epoch)?);
    }
    let mut first = 0;
    loop {
        let page = listing.granules_seen_from(snapshot.epoch, first, GRANULES_PAGE)?;
        let Some(&last) = page.last() else {
            return Ok(());
        };
        each(&page)?;
        if page.len() < GRANULES_PAGE {
            return Ok(());
        }
        first = last + 1;
    }
}

/// One snapshot being sent: its granules read old and new, the blocks that differ sent, and
/// the sum brought up to date with every granule's change.
struct Changes<'a> {
    size: u64,
    old: &'a dyn GranuleReader,
    new: &'a dyn GranuleReader,
    /// A resumed snapshot: the records of the granules before this one were received (their
    /// bytes are still read, for the sum).
    skip_below: u64,
    sum: ContentHash,
    /// The snapshot's sum is not recorded yet: each granule's change goes into `sum`.
    summing: bool,
    runs: Runs,
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Changes<'_> {
    /// Sends the blocks of `granules` (ascending, after every granule sent before) that
    /// differ; `progress` hears of the granule reached and the stream's bytes.
    fn send<W: Write>(
        &mut self,
        writer: &mut StreamWriter<W>,
        sent: &mut Sent,
        granules: &[u64],
        progress: &mut dyn FnMut(u64, u64),
    ) -> io::Result<()> {
        let block = BLOCK as usize;
        for (i, &granule) in granules.iter().enumerate() {
            self.old.read_granule(granule, &mut self.before)?;
            self.new.read_granule(granule, &mut self.after)?;
            if self.summing {
                self.sum.change(granule, &self.before, &self.after);
            }
            if granule >= self.skip_below {
                let start = granule * GRANULE;
                for (b, (old, new)) in self
                    .before
                    .chunks_exact(block)
                    .zip(self.after.chunks_exact(block))
                    .enumerate()
                {
                    let offset = start + (b * block) as u64;
                    // Past the end both sides read zeros: nothing there differs.
                    if offset >= self.size {
                        break;
                    }
                    if old != new {
                        self.runs.block(writer, sent, offset, new)?;
                    }
                }
            }
            if i.is_multiple_of(PROGRESS_EVERY) {
                progress(granule, writer.bytes());
            }
        }
        Ok(())
    }

    /// The last record gathered goes; the snapshot's sum.
    fn finish<W: Write>(
        mut self,
        writer: &mut StreamWriter<W>,
        sent: &mut Sent,
    ) -> io::Result<ContentHash> {
        self.runs.flush(writer, sent)?;
        Ok(self.sum)
    }
}

/// The record being gathered: contiguous blocks of data (up to `MAX_DATA`), or of zeros.
#[derive(Default)]
enum Runs {
    #[default]
    Empty,
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

impl Runs {
    /// One block to send at `offset` (after every block sent before it).
    fn block<W: Write>(
        &mut self,
        writer: &mut StreamWriter<W>,
        sent: &mut Sent,
        offset: u64,
        bytes: &[u8],
    ) -> io::Result<()> {
        let zeros = is_zero(bytes);
        match self {
            Runs::Data { offset: o, data }
                if !zeros && *o + data.len() as u64 == offset && data.len() < MAX_DATA =>
            {
                data.extend_from_slice(bytes);
                return Ok(());
            }
            Runs::Zero { offset: o, len } if zeros && *o + *len == offset => {
                *len += bytes.len() as u64;
                return Ok(());
            }
            _ => {}
        }
        self.flush(writer, sent)?;
        *self = if zeros {
            Runs::Zero {
                offset,
                len: bytes.len() as u64,
            }
        } else {
            let mut data = Vec::with_capacity(MAX_DATA);
            data.extend_from_slice(bytes);
            Runs::Data { offset, data }
        };
        Ok(())
    }

    fn flush<W: Write>(&mut self, writer: &mut StreamWriter<W>, sent: &mut Sent) -> io::Result<()> {
        match std::mem::take(self) {
            Runs::Empty => {}
            Runs::Data { offset, data } => {
                sent.data_bytes += data.len() as u64;
                writer.write(&Record::Data { offset, data })?;
            }
            Runs::Zero { offset, len } => {
                sent.zero_bytes += len;
                writer.write(&Record::Zero { offset, len })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::format::stream::{ResumePoint, StreamImage, StreamReader};
    use crate::format::volume::VolumeFiles;

    use super::super::{open_for_test, Volume};

    use crate::core::test_rng::Rng;

    /// A base image in memory.
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

    /// Some content in memory, as a granule reader (zeros past its end).
    struct Content<'a>(&'a [u8]);

    impl GranuleReader for Content<'_> {
        fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()> {
            let start = ((granule * GRANULE) as usize).min(self.0.len());
            let end = (start + buf.len()).min(self.0.len());
            buf[..end - start].copy_from_slice(&self.0[start..end]);
            buf[end - start..].fill(0);
            Ok(())
        }
    }

    const BASE_SHA512: [u8; 64] = [0xab; 64];

    /// A volume in a temporary directory over a base image of random bytes with a hole.
    struct Fixture {
        _dir: tempfile::TempDir,
        files: VolumeFiles,
        base: Arc<Vec<u8>>,
        volume: Arc<Volume>,
        rng: Rng,
        snapshots: usize,
    }

    impl Fixture {
        fn new(seed: u64, size: u64, base_size: usize) -> Fixture {
            let dir = if std::path::Path::new("/dev/shm").is_dir() {
                tempfile::tempdir_in("/dev/shm").unwrap()
            } else {
                tempfile::tempdir().unwrap()
            };
            let mut rng = Rng(seed | 1);
            let mut base: Vec<u8> = (0..base_size).map(|_| rng.next() as u8).collect();
            // A stretch of zeros: discards and zero writes there read as the base.
            let hole = base_size / 3;
            base[hole..hole + base_size / 4].fill(0);
            let base = Arc::new(base);
            let volume = Arc::new(open_for_test(
                dir.path(),
                size,
                Box::new(Bytes(base.clone())),
            ));
            Fixture {
                files: VolumeFiles::new(dir.path()),
                _dir: dir,
                base,
                volume,
                rng,
                snapshots: 0,
            }
        }

        /// Random writes (unaligned, of random bytes or zeros), discards and now and then a
        /// growth of the volume.
        fn scribble(&mut self, steps: usize) {
            for _ in 0..steps {
                let size = self.volume.size();
                match self.rng.below(10) {
                    0..=5 => {
                        let len = 1 + self.rng.below(3 * GRANULE).min(size - 1);
                        let offset = self.rng.below(size - len + 1);
                        let zeros = self.rng.below(5) == 0;
                        let data: Vec<u8> = (0..len)
                            .map(|_| if zeros { 0 } else { self.rng.next() as u8 })
                            .collect();
                        self.volume.write_at(&data, offset).unwrap();
                    }
                    6..=8 => {
                        let len = BLOCK * (1 + self.rng.below(20));
                        let offset = BLOCK * self.rng.below((size - len) / BLOCK + 1);
                        self.volume.discard(offset, len).unwrap();
                    }
                    _ => self
                        .volume
                        .resize(size + BLOCK * self.rng.below(40))
                        .unwrap(),
                }
            }
        }

        fn snapshot(&mut self) -> Snapshot {
            self.snapshots += 1;
            let n = self.snapshots;
            self.volume
                .snapshot(&format!("s{n}"), &format!("guid-{n}"), n as i64)
                .unwrap()
        }

        /// The volume at a snapshot, read through its reader.
        fn read(&self, snapshot: &Snapshot) -> Vec<u8> {
            let reader = self.volume.open_snapshot(snapshot.epoch).unwrap();
            let mut out = vec![0u8; snapshot.size as usize];
            assert_eq!(reader.read_at(&mut out, 0).unwrap(), out.len());
            out
        }

        fn package(&self, from: Option<&Snapshot>, to: &Snapshot, from_all: bool) -> Package {
            let all = self.volume.snapshots().unwrap();
            let snapshots = package_snapshots(&all, from, to, from_all);
            Package {
                header: Header {
                    package: "package".into(),
                    volume: "v".into(),
                    volume_uuid: "volume-uuid".into(),
                    base_image: Some(StreamImage {
                        name: "base".into(),
                        uuid: "base-uuid".into(),
                        sha512: hex::encode(BASE_SHA512),
                        size: self.base.len() as u64,
                    }),
                    from: from.map(|f| stream_snapshot(f, false)),
                    snapshots: snapshots
                        .iter()
                        .map(|s| stream_snapshot(s, false))
                        .collect(),
                    from_all,
                    with_image: false,
                    resume: None,
                },
                from: from.cloned(),
                snapshots,
            }
        }

        /// The stream of `package`; checks that no more than two snapshots were held at once.
        fn send(&self, package: &Package) -> (Vec<u8>, Sent) {
            let listing = SnapshotListing::open(&self.files).unwrap();
            let sums = ContentSums::open(&self.files).unwrap();
            let base = Bytes(self.base.clone());
            let held = Rc::new(Cell::new(0usize));
            let most = Rc::new(Cell::new(0usize));
            let open = |s: &Snapshot| -> io::Result<Box<dyn GranuleReader>> {
                held.set(held.get() + 1);
                most.set(most.get().max(held.get()));
                Ok(Box::new(Held {
                    reader: self.volume.open_snapshot(s.epoch)?,
                    held: held.clone(),
                }))
            };
            let source = SendSource {
                listing: &listing,
                open: &open,
                base: &base,
                sums: &sums,
            };
            let mut out = Vec::new();
            let sent = send(&source, package, &mut out, &mut |_| {}).unwrap();
            assert_eq!(sent.bytes, out.len() as u64);
            assert_eq!(held.get(), 0, "every snapshot reader was let go");
            assert!(
                most.get() <= 2,
                "{} snapshots were held at once",
                most.get()
            );
            (out, sent)
        }

        /// What the sum of `content` is, computed from scratch over every granule.
        fn digest_from_scratch(&self, content: &[u8]) -> [u8; 32] {
            let granules: Vec<u64> = (0..(content.len() as u64).div_ceil(GRANULE)).collect();
            let sum = sum_changes(
                ContentHash::default(),
                &granules,
                &Content(&self.base),
                &Content(content),
            )
            .unwrap();
            sum.digest(content.len() as u64, Some(&hex::encode(BASE_SHA512)))
        }
    }

    use std::rc::Rc;

    /// A snapshot reader that counts itself.
    struct Held {
        reader: super::super::SnapshotReader,
        held: Rc<Cell<usize>>,
    }

    impl GranuleReader for Held {
        fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()> {
            self.reader.read_granule(granule, buf)
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            self.held.set(self.held.get() - 1);
        }
    }

    /// A stream applied to a plain byte array, as a receiver would.
    #[derive(Default)]
    struct Applied {
        header: Option<Header>,
        /// Each snapshot's index, content and digest, in order.
        snapshots: Vec<(u32, Vec<u8>, [u8; 32])>,
        image: Vec<u8>,
        image_sha512: Option<[u8; 64]>,
        /// The records of each kind, offsets and lengths of `Data` and `Zero`.
        data: Vec<(u64, Vec<u8>)>,
        zero: Vec<(u64, u64)>,
    }

    /// Applies `stream` on `content` (the base image, or the receiver's content at the
    /// package's `from`); `stop` cuts it before the first record of snapshot `done` at or past
    /// granule `granule` (the state an interrupted receive keeps).
    fn apply(stream: &[u8], mut content: Vec<u8>, stop: Option<ResumePoint>) -> (Applied, Vec<u8>) {
        let mut reader = StreamReader::new(stream).unwrap();
        let mut applied = Applied::default();
        let mut current = None;
        let mut last_end = 0u64;
        loop {
            let record = reader.next().unwrap();
            let offset = match &record {
                Record::Data { offset, .. } | Record::Zero { offset, .. } => Some(*offset),
                Record::SnapshotEnd { .. } => Some(u64::MAX),
                _ => None,
            };
            if let (Some(stop), Some(offset), Some(index)) = (stop, offset, current) {
                if index as usize == stop.done && offset >= stop.granule * GRANULE {
                    return (applied, content);
                }
            }
            match record {
                Record::Header(h) => applied.header = Some(h),
                Record::ImageData { offset, data } => {
                    let end = offset as usize + data.len();
                    if applied.image.len() < end {
                        applied.image.resize(end, 0);
                    }
                    applied.image[offset as usize..end].copy_from_slice(&data);
                }
                Record::ImageEnd { sha512 } => applied.image_sha512 = Some(sha512),
                Record::SnapshotBegin { index, size } => {
                    assert!(content.len() as u64 <= size, "a volume never shrinks");
                    content.resize(size as usize, 0);
                    current = Some(index);
                    last_end = 0;
                }
                Record::Data { offset, data } => {
                    assert!(offset >= last_end, "records go up");
                    assert_eq!(offset % BLOCK, 0);
                    assert_eq!(data.len() as u64 % BLOCK, 0);
                    assert!(data.len() <= MAX_DATA);
                    assert!(data.iter().any(|&b| b != 0), "zeros go as Zero records");
                    last_end = offset + data.len() as u64;
                    content[offset as usize..last_end as usize].copy_from_slice(&data);
                    applied.data.push((offset, data));
                }
                Record::Zero { offset, len } => {
                    assert!(offset >= last_end, "records go up");
                    assert_eq!(offset % BLOCK, 0);
                    assert_eq!(len % BLOCK, 0);
                    last_end = offset + len;
                    content[offset as usize..last_end as usize].fill(0);
                    applied.zero.push((offset, len));
                }
                Record::SnapshotEnd { index, digest } => {
                    assert_eq!(Some(index), current);
                    applied.snapshots.push((index, content.clone(), digest));
                    current = None;
                }
                Record::End => return (applied, content),
            }
        }
    }

    /// The base image as a volume of `size` bytes reads it.
    fn base_content(base: &[u8], size: u64) -> Vec<u8> {
        let mut content = base.to_vec();
        content.resize(size as usize, 0);
        content
    }

    #[test]
    fn every_snapshot_of_a_package_reads_as_the_volume_did_and_proves_its_content() {
        for seed in 1..=6u64 {
            let mut f = Fixture::new(seed * 7919, 40 * GRANULE, 23 * GRANULE as usize + 1234);
            let mut snapshots = Vec::new();
            for _ in 0..6 {
                let steps = 1 + f.rng.below(25) as usize;
                f.scribble(steps);
                snapshots.push(f.snapshot());
            }
            f.scribble(10);
            let contents: Vec<Vec<u8>> = snapshots.iter().map(|s| f.read(s)).collect();
            let last = snapshots.last().unwrap();

            // Every snapshot from the first, which goes whole.
            let package = f.package(None, last, true);
            let (stream, sent) = f.send(&package);
            let start = base_content(&f.base, snapshots[0].size);
            let (applied, _) = apply(&stream, start, None);
            assert_eq!(applied.header.as_ref(), Some(&package.header));
            assert_eq!(sent.snapshots_sent, snapshots.len());
            assert_eq!(applied.snapshots.len(), snapshots.len());
            for (i, (index, content, digest)) in applied.snapshots.iter().enumerate() {
                assert_eq!(*index as usize, i);
                assert!(*content == contents[i], "seed {seed}: snapshot {i} differs");
                assert_eq!(
                    *digest,
                    f.digest_from_scratch(&contents[i]),
                    "seed {seed}: digest of snapshot {i}"
                );
            }

            // From a snapshot in the middle: each in between, and alone to the last.
            let from = &snapshots[2];
            for from_all in [true, false] {
                let package = f.package(Some(from), last, from_all);
                let (stream, _) = f.send(&package);
                let (applied, _) = apply(&stream, contents[2].clone(), None);
                let expected: Vec<usize> = if from_all { (3..6).collect() } else { vec![5] };
                assert_eq!(applied.snapshots.len(), expected.len());
                for ((_, content, digest), i) in applied.snapshots.iter().zip(expected) {
                    assert!(
                        *content == contents[i],
                        "seed {seed}: from s3, snapshot {i} differs"
                    );
                    assert_eq!(*digest, f.digest_from_scratch(&contents[i]));
                }
            }
        }
    }

    #[test]
    fn an_incremental_after_scattered_writes_carries_the_changed_blocks_alone() {
        let mut f = Fixture::new(42, 64 * GRANULE, 64 * GRANULE as usize);
        // Everything written once, so that every granule has a version before the snapshot.
        let all: Vec<u8> = (0..64 * GRANULE).map(|_| f.rng.next() as u8).collect();
        f.volume.write_at(&all, 0).unwrap();
        let before = f.snapshot();
        let mut expected = BTreeMap::new();
        for _ in 0..40 {
            let block = f.rng.below(64 * GRANULE / BLOCK);
            let data: Vec<u8> = (0..BLOCK).map(|_| f.rng.next() as u8 | 1).collect();
            f.volume.write_at(&data, block * BLOCK).unwrap();
            expected.insert(block * BLOCK, data);
        }
        // Two neighbours across a granule's edge: one record.
        for block in [GRANULE / BLOCK * 10 - 1, GRANULE / BLOCK * 10] {
            let data = vec![7u8; BLOCK as usize];
            f.volume.write_at(&data, block * BLOCK).unwrap();
            expected.insert(block * BLOCK, data);
        }
        // A block written with what it holds is no change.
        let same = 33 * GRANULE + 5 * BLOCK;
        if !expected.contains_key(&same) {
            let range = same as usize..(same + BLOCK) as usize;
            f.volume.write_at(&all[range], same).unwrap();
        }
        // A discarded block reads as zeros: a Zero record.
        let discarded = 50 * GRANULE + 2 * BLOCK;
        expected.remove(&discarded);
        f.volume.discard(discarded, BLOCK).unwrap();
        let after = f.snapshot();

        let (stream, sent) = f.send(&f.package(Some(&before), &after, false));
        let (applied, content) = apply(&stream, all.clone(), None);
        assert!(content == f.read(&after));
        let mut got = BTreeMap::new();
        for (offset, data) in &applied.data {
            for (i, block) in data.chunks(BLOCK as usize).enumerate() {
                got.insert(offset + i as u64 * BLOCK, block.to_vec());
            }
        }
        assert_eq!(
            got, expected,
            "the Data records carry exactly the blocks written"
        );
        assert_eq!(applied.zero, vec![(discarded, BLOCK)]);
        assert_eq!(sent.data_bytes, expected.len() as u64 * BLOCK);
        assert!(
            applied
                .data
                .iter()
                .any(|(o, d)| *o == 10 * GRANULE - BLOCK && d.len() == 2 * BLOCK as usize),
            "contiguous blocks across granules are one record"
        );
        // The stream is about the bytes that changed: framing is small.
        assert!(sent.bytes < sent.data_bytes + 4096, "{sent:?}");
    }

    #[test]
    fn a_sum_recorded_or_computed_gives_the_same_digest() {
        let mut f = Fixture::new(7, 32 * GRANULE, 20 * GRANULE as usize);
        f.scribble(30);
        let a = f.snapshot();
        f.scribble(30);
        let b = f.snapshot();
        let content_b = f.read(&b);
        let sums = ContentSums::open(&f.files).unwrap();
        let package = f.package(Some(&a), &b, false);

        assert_eq!(sums.get(&a.guid).unwrap(), None);
        let (computed, _) = f.send(&package);
        let recorded_a = sums
            .get(&a.guid)
            .unwrap()
            .expect("the starting sum was recorded");
        let recorded_b = sums
            .get(&b.guid)
            .unwrap()
            .expect("the sent snapshot's sum too");
        let (recorded, _) = f.send(&package);
        assert_eq!(sums.get(&a.guid).unwrap(), Some(recorded_a));
        assert_eq!(sums.get(&b.guid).unwrap(), Some(recorded_b));
        let digest = |stream: &[u8]| apply(stream, f.read(&a), None).0.snapshots[0].2;
        assert_eq!(digest(&computed), f.digest_from_scratch(&content_b));
        assert_eq!(digest(&recorded), digest(&computed));

        // A recorded sum is taken as it is, the sent snapshot's own too (it is not hashed
        // again): a wrong one shows in the digest, and the receiver would refuse the stream.
        sums.put(&b.guid, &ContentHash::default()).unwrap();
        let (wrong_b, _) = f.send(&package);
        assert_ne!(digest(&wrong_b), digest(&computed));
        sums.retain(&[a.guid.clone()].into_iter().collect())
            .unwrap();
        sums.put(&a.guid, &ContentHash::default()).unwrap();
        let (wrong_a, _) = f.send(&package);
        assert_ne!(digest(&wrong_a), digest(&computed));
    }

    #[test]
    fn a_resumed_stream_ends_as_the_whole_one() {
        for seed in 1..=4u64 {
            let mut f = Fixture::new(seed * 104_729, 48 * GRANULE, 30 * GRANULE as usize);
            let mut snapshots = Vec::new();
            for _ in 0..4 {
                f.scribble(20);
                snapshots.push(f.snapshot());
            }
            let last = snapshots.last().unwrap().clone();
            let package = f.package(None, &last, true);
            let (whole, _) = f.send(&package);
            let start = base_content(&f.base, snapshots[0].size);
            let (full, _) = apply(&whole, start.clone(), None);

            for done in 0..snapshots.len() {
                // A granule in the middle of what the snapshot sends, and its first.
                let granules = match done {
                    0 => f.volume_granules_seen(snapshots[0].epoch),
                    n => f.volume_granules_changed(snapshots[n - 1].epoch, snapshots[n].epoch),
                };
                let middle = granules.get(granules.len() / 2).copied().unwrap_or(0);
                for granule in [0, middle] {
                    let point = ResumePoint { done, granule };
                    let (first_part, kept) = apply(&whole, start.clone(), Some(point));
                    assert_eq!(first_part.snapshots.len(), done);
                    let mut resumed = f.package(None, &last, true);
                    resumed.header.resume = Some(point);
                    let (rest, sent) = f.send(&resumed);
                    assert_eq!(sent.snapshots_sent, snapshots.len() - done);
                    let (second_part, _) = apply(&rest, kept, None);
                    let together: Vec<_> = first_part
                        .snapshots
                        .into_iter()
                        .chain(second_part.snapshots)
                        .collect();
                    assert!(
                        together == full.snapshots,
                        "seed {seed}: resumed at {point:?}, the snapshots or digests differ"
                    );
                }
            }
        }
    }

    #[test]
    fn the_base_image_goes_whole_and_sparse_with_its_sha512() {
        let mut f = Fixture::new(3, 32 * GRANULE, 20 * GRANULE as usize + 100);
        f.scribble(5);
        let s = f.snapshot();
        let mut package = f.package(None, &s, false);
        package.header.with_image = true;
        let (stream, sent) = f.send(&package);
        let (applied, _) = apply(&stream, base_content(&f.base, s.size), None);
        let mut image = applied.image.clone();
        image.resize(f.base.len(), 0);
        assert!(image == *f.base);
        assert_eq!(applied.image_sha512, Some(BASE_SHA512));
        // The stretch of zeros in the base does not cross.
        assert!(sent.image_bytes < f.base.len() as u64 - f.base.len() as u64 / 5);
        assert_eq!(applied.snapshots[0].1, f.read(&s));
    }

    #[test]
    fn granules_changed_are_those_whose_seen_version_is_newer() {
        let mut f = Fixture::new(99, 32 * GRANULE, 16 * GRANULE as usize);
        let mut snapshots = Vec::new();
        for _ in 0..6 {
            f.scribble(12);
            snapshots.push(f.snapshot());
        }
        // A deleted snapshot in the middle and a reclaim: what it alone saw goes.
        f.volume.delete_snapshots(&[snapshots[2].epoch]).unwrap();
        while f.volume.reclaim().unwrap() {}
        snapshots.remove(2);
        let granules = f.volume.size().div_ceil(GRANULE);
        let state = f.volume.state.lock();
        for (i, a) in snapshots.iter().enumerate() {
            for b in &snapshots[i + 1..] {
                let changed = state.index.granules_changed(a.epoch, b.epoch).unwrap();
                let brute: Vec<u64> = (0..granules)
                    .filter(|&g| {
                        let seen = state.index.at(g, b.epoch).unwrap();
                        seen.is_some_and(|v| v.birth > a.epoch)
                    })
                    .collect();
                assert_eq!(changed, brute, "between {} and {}", a.name, b.name);
            }
        }
        // Page by page, a whole snapshot's granules are those it sees.
        let pages: Vec<Vec<u64>> = snapshots
            .iter()
            .map(|s| state.index.granules_seen(Some(s.epoch)).unwrap())
            .collect();
        drop(state);
        for (s, all) in snapshots.iter().zip(pages) {
            assert!(all.len() > GRANULES_PAGE, "{} spans pages", s.name);
            assert_eq!(f.volume_granules_seen(s.epoch), all);
        }
        // And every granule whose bytes differ is among them.
        for (i, a) in snapshots.iter().enumerate() {
            let (content_a, b) = (f.read(a), &snapshots[snapshots.len() - 1]);
            let content_b = f.read(b);
            let changed = f.volume_granules_changed(a.epoch, b.epoch);
            for g in 0..granules {
                let range = |c: &[u8]| {
                    let mut buf = vec![0u8; GRANULE as usize];
                    Content(c).read_granule(g, &mut buf).unwrap();
                    buf
                };
                if range(&content_a) != range(&content_b) {
                    assert!(
                        changed.contains(&g),
                        "granule {g} changed after snapshot {i}"
                    );
                }
            }
        }
    }

    impl Fixture {
        fn volume_granules_seen(&self, epoch: u64) -> Vec<u64> {
            let listing = SnapshotListing::open(&self.files).unwrap();
            let mut all = Vec::new();
            for_each_page(&listing, None, &self.snapshot_at(epoch), |page| {
                all.extend_from_slice(page);
                Ok(())
            })
            .unwrap();
            all
        }

        fn snapshot_at(&self, epoch: u64) -> Snapshot {
            let snapshots = self.volume.snapshots().unwrap();
            snapshots.into_iter().find(|s| s.epoch == epoch).unwrap()
        }

        fn volume_granules_changed(&self, after: u64, at: u64) -> Vec<u64> {
            SnapshotListing::open(&self.files)
                .unwrap()
                .granules_changed(after, at)
                .unwrap()
        }
    }
}
