//! qcow2 images, read as the flat disk they describe, through their backing chain: the header,
//! the L1 and L2 tables (standard and extended L2), plain, zero, compressed (zlib or zstd) and
//! unallocated clusters. Read only; what an import needs and no more: the data extents come from
//! the tables (never from reading zeros), and reads go to the layer that holds each cluster.
//! The format is QEMU's `docs/interop/qcow2.txt`; this is our own reader of it (see
//! docs/decisions.md, "Imports").

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::format::sparse::{self, SparseSource};

/// The first four bytes of every qcow2 file.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// How long a backing chain may be before we call it a loop.
const MAX_CHAIN: usize = 64;
/// The most L1 entries QEMU writes or reads (`QCOW_MAX_L1_SIZE`, 32 MiB of entries).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// Incompatible feature bits (header bytes 72..80, version 3).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// Bits 9..55 of an L1 or L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard cluster descriptor: the cluster reads as zeros.
const L2_ZERO: u64 = 1;

/// Whether `file` starts with the qcow2 magic (a file shorter than it is not qcow2).
pub fn is_qcow2(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    Ok(sparse::read_full_at(file, &mut magic, 0)? == 4 && magic == MAGIC)
}

/// The virtual size a qcow2 file's header states, without checking the rest; `None` for a file
/// that is not qcow2.
pub fn virtual_size(file: &File) -> io::Result<Option<u64>> {
    let mut head = [0u8; 32];
    let got = sparse::read_full_at(file, &mut head, 0)?;
    Ok((got == head.len() && head[..4] == MAGIC).then(|| be64(&head, 24)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Zlib,
    Zstd,
}

/// The layer below a qcow2 image: where its unallocated clusters read from.
enum Backing {
    None,
    Raw {
        path: PathBuf,
        file: File,
        size: u64,
    },
    Qcow2(Box<Qcow2>),
}

/// One qcow2 file of a chain, with its backing layers.
pub struct Qcow2 {
    path: PathBuf,
    file: File,
    file_len: u64,
    size: u64,
    cluster_bits: u32,
    /// Extended L2: 128-bit entries and 32 subclusters per cluster.
    extended: bool,
    compression: Compression,
    l1: Vec<u64>,
    backing: Backing,
    /// The L2 table read last (by its host offset): reads and the extent scan go in order.
    l2_cache: Mutex<Option<(u64, Arc<Vec<u64>>)>>,
    /// The compressed cluster decompressed last (by its descriptor).
    cluster_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

/// Where a run of guest bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Not allocated here: the backing layer's bytes (zeros past its end, or without one).
    Backing,
    Zero,
    /// Stored as is at this host offset.
    Data(u64),
    /// The compressed cluster this descriptor names; the run starts `.1` bytes into it.
    Compressed(u64, u64),
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::refused(
        ErrorKind::Corrupt,
        format!(
            "{} is a damaged qcow2 image ({what}): `qemu-img check` tells more",
            path.display()
        ),
    )
}

fn unsupported(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::refused(
        ErrorKind::InvalidInput,
        format!(
            "{} uses {what}, which imgpool does not read: convert it first (`qemu-img convert -O qcow2` or `-O raw`)",
            path.display()
        ),
    )
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn io_corrupt(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("damaged qcow2 image {}: {what}", path.display()),
    )
}

impl Qcow2 {
    /// Opens the qcow2 image at `path` and its whole backing chain. Every refusal is one line
    /// naming the file: a backing file that is missing, encryption, a feature we do not read, a
    /// header or table that does not hold together.
    pub fn open(path: &Path) -> Result<Qcow2> {
        Self::open_in_chain(path, 0)
    }

    fn open_in_chain(path: &Path, depth: usize) -> Result<Qcow2> {
        if depth > MAX_CHAIN {
            return Err(corrupt(
                path,
                format!("its backing chain is longer than {MAX_CHAIN} files, a loop?"),
            ));
        }
        let file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open qcow2 image {}", path.display()), e))?;
        let file_len = length(&file, path)?;
        let read_head = |len: u64| -> Result<Vec<u8>> {
            let mut head = vec![0u8; len.min(file_len) as usize];
            sparse::read_full_at(&file, &mut head, 0)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
            Ok(head)
        };
        let mut head = read_head(4096)?;
        if head.len() < 72 || head[..4] != MAGIC {
            return Err(corrupt(path, "no qcow2 header"));
        }
        let version = be32(&head, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(path, format!("qcow2 version {version}")));
        }
        let backing_offset = be64(&head, 8);
        let backing_len = be32(&head, 16) as u64;
        let cluster_bits = be32(&head, 20);
        let size = be64(&head, 24);
        let crypt_method = be32(&head, 32);
        let l1_size = be32(&head, 36) as u64;
        let l1_offset = be64(&head, 40);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(path, format!("cluster_bits {cluster_bits}")));
        }
        let cluster_size = 1u64 << cluster_bits;
        // The header, its extensions and the backing file name fill at most the first cluster.
        if cluster_size > head.len() as u64 {
            head = read_head(cluster_size)?;
        }
        if crypt_method != 0 {
            let how = if crypt_method == 1 { "AES" } else { "LUKS" };
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "{} is an encrypted qcow2 image ({how}): imgpool stores images in the clear; decrypt it first with `qemu-img convert` and its secret (to raw or unencrypted qcow2)",
                    path.display()
                ),
            ));
        }

        let (mut incompatible, header_len, mut compression) = (0u64, 72usize, Compression::Zlib);
        let header_len = if version == 3 {
            if head.len() < 104 {
                return Err(corrupt(path, "truncated version 3 header"));
            }
            incompatible = be64(&head, 72);
            let len = be32(&head, 100) as usize;
            if len < 104 || len > head.len() || !len.is_multiple_of(8) {
                return Err(corrupt(path, format!("header length {len}")));
            }
            if incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
                if len < 105 {
                    return Err(corrupt(path, "compression type bit set without the field"));
                }
                compression = match head[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    other => return Err(unsupported(path, format!("compression type {other}"))),
                };
            }
            len
        } else {
            header_len
        };
        let names = feature_names(&head, header_len);
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| match names.iter().find(|(b, _)| *b == bit) {
                    Some((_, name)) => format!("'{name}' (bit {bit})"),
                    None => format!("bit {bit}"),
                })
                .collect();
            return Err(unsupported(
                path,
                format!("the incompatible feature {}", bits.join(", ")),
            ));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(path, "QEMU marked it corrupt"));
        }
        if incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(unsupported(path, "an external data file"));
        }
        let extended = incompatible & INCOMPAT_EXTENDED_L2 != 0;
        if extended && cluster_bits < 14 {
            return Err(corrupt(path, "extended L2 with clusters under 16 KiB"));
        }

        // The L1 table must cover the whole disk.
        let entry_bytes: u64 = if extended { 16 } else { 8 };
        let l2_entries = cluster_size / entry_bytes;
        let needed_l1 = size.div_ceil(cluster_size * l2_entries);
        // QEMU's own bound on the L1 table (32 MiB), which also bounds what we allocate.
        if needed_l1 > MAX_L1_ENTRIES {
            return Err(corrupt(path, format!("a virtual size of {size} bytes")));
        }
        if l1_size < needed_l1 {
            return Err(corrupt(
                path,
                format!("its L1 table has {l1_size} entries, the disk needs {needed_l1}"),
            ));
        }
        if !l1_offset.is_multiple_of(cluster_size)
            || l1_offset
                .checked_add(l1_size * 8)
                .is_none_or(|end| end > file_len)
        {
            return Err(corrupt(
                path,
                format!("its L1 table at {l1_offset} is misplaced or past the end of the file"),
            ));
        }
        let mut raw = vec![0u8; (needed_l1 * 8) as usize];
        sparse::read_full_at(&file, &mut raw, l1_offset)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|e| be64(e, 0)).collect();

        let backing = if backing_offset == 0 {
            Backing::None
        } else {
            let end = backing_offset.checked_add(backing_len);
            if backing_len == 0 || backing_len > 1023 || end.is_none_or(|e| e > head.len() as u64) {
                return Err(corrupt(path, "its backing file name is misplaced"));
            }
            let name = &head[backing_offset as usize..(backing_offset + backing_len) as usize];
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| corrupt(path, "its backing file name is not UTF-8"))?;
            let format = backing_format(&head, header_len);
            Self::open_backing(path, &name, format.as_deref(), depth)?
        };

        Ok(Qcow2 {
            path: path.to_path_buf(),
            file,
            file_len,
            size,
            cluster_bits,
            extended,
            compression,
            l1,
            backing,
            l2_cache: Mutex::new(None),
            cluster_cache: Mutex::new(None),
        })
    }

    /// Opens the backing file `name` of the image at `of`: relative to the image's directory,
    /// as QEMU resolves it, in the format the header names (or, with none, as its content says).
    fn open_backing(of: &Path, name: &str, format: Option<&str>, depth: usize) -> Result<Backing> {
        if name.starts_with("json:") || (name.contains("://") && !name.starts_with('/')) {
            return Err(unsupported(
                of,
                format!("the backing file {name:?} (not a file path)"),
            ));
        }
        let path = of.parent().unwrap_or(Path::new(".")).join(name);
        let file = File::open(&path).map_err(|e| {
            let why = if e.kind() == io::ErrorKind::NotFound {
                "is missing".to_string()
            } else {
                format!("cannot be opened ({e})")
            };
            Error::refused(
                ErrorKind::NotFound,
                format!(
                    "the backing file {} of {} {why}: put it back where the image names it (`qemu-img info --backing-chain` shows the chain), or flatten the image with `qemu-img convert`",
                    path.display(),
                    of.display()
                ),
            )
        })?;
        let qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => {
                return Err(unsupported(
                    of,
                    format!("a backing file in format {other:?}"),
                ))
            }
            None => is_qcow2(&file)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?,
        };
        if qcow2 {
            Ok(Backing::Qcow2(Box::new(Self::open_in_chain(
                &path,
                depth + 1,
            )?)))
        } else {
            let size = length(&file, &path)?;
            Ok(Backing::Raw { path, file, size })
        }
    }

    /// The virtual disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Every file of the chain, this one first: what an import must see unchanged.
    pub fn chain_files(&self) -> Vec<(PathBuf, &File)> {
        let mut files = vec![(self.path.clone(), &self.file)];
        match &self.backing {
            Backing::None => {}
            Backing::Raw { path, file, .. } => files.push((path.clone(), file)),
            Backing::Qcow2(q) => files.extend(q.chain_files()),
        }
        files
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        let entry_bytes = if self.extended { 16 } else { 8 };
        self.cluster_size() / entry_bytes * self.cluster_size()
    }

    /// The L2 table at host offset `at`, as raw big-endian-decoded words.
    fn l2_table(&self, at: u64) -> io::Result<Arc<Vec<u64>>> {
        let mut cache = self.l2_cache.lock().unwrap();
        if let Some((offset, table)) = cache.as_ref() {
            if *offset == at {
                return Ok(table.clone());
            }
        }
        let cluster = self.cluster_size();
        if !at.is_multiple_of(cluster) || at + cluster > self.file_len {
            return Err(io_corrupt(
                &self.path,
                format!("an L2 table at {at} is misaligned or past the end of the file"),
            ));
        }
        let mut raw = vec![0u8; cluster as usize];
        sparse::read_full_at(&self.file, &mut raw, at)?;
        let table = Arc::new(raw.chunks_exact(8).map(|e| be64(e, 0)).collect::<Vec<_>>());
        *cache = Some((at, table.clone()));
        Ok(table)
    }

    /// What the guest byte at `pos` is, and where the run of bytes it belongs to ends (the end
    /// of its cluster, or subcluster with extended L2; of its L2 table's span when the table is
    /// absent).
    fn piece_at(&self, pos: u64) -> io::Result<(Piece, u64)> {
        let span = self.l2_span();
        let l1_index = (pos / span) as usize;
        let l2_offset = self.l1[l1_index] & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Piece::Backing, (l1_index as u64 + 1) * span));
        }
        let table = self.l2_table(l2_offset)?;
        let cluster = self.cluster_size();
        let cluster_start = pos & !(cluster - 1);
        let index = ((pos % span) / cluster) as usize;
        let cluster_end = cluster_start + cluster;
        let (entry, bitmap) = if self.extended {
            (table[2 * index], Some(table[2 * index + 1]))
        } else {
            (table[index], None)
        };
        if entry & L2_COMPRESSED != 0 {
            return Ok((Piece::Compressed(entry, pos - cluster_start), cluster_end));
        }
        let host = entry & OFFSET_MASK;
        if !host.is_multiple_of(cluster) {
            return Err(io_corrupt(
                &self.path,
                format!("the cluster at guest offset {cluster_start} is misaligned"),
            ));
        }
        let Some(bitmap) = bitmap else {
            let piece = if entry & L2_ZERO != 0 {
                Piece::Zero
            } else if host == 0 {
                Piece::Backing
            } else {
                Piece::Data(host + (pos - cluster_start))
            };
            return Ok((piece, cluster_end));
        };
        let sub = cluster / 32;
        let index = (pos - cluster_start) / sub;
        let (allocated, zero) = (bitmap >> index & 1 != 0, bitmap >> (32 + index) & 1 != 0);
        let piece = match (allocated, zero) {
            (true, true) => {
                return Err(io_corrupt(
                    &self.path,
                    format!("subcluster at guest offset {pos} is both allocated and zero"),
                ))
            }
            (true, false) if host != 0 => Piece::Data(host + (pos - cluster_start)),
            (true, false) => {
                return Err(io_corrupt(
                    &self.path,
                    format!("subcluster at guest offset {pos} is allocated in no cluster"),
                ))
            }
            (false, true) => Piece::Zero,
            (false, false) => Piece::Backing,
        };
        Ok((piece, cluster_start + (index + 1) * sub))
    }

    /// The runs of [start, end) as (piece, run end): neighbouring pieces of one kind that
    /// continue each other (data stored contiguously, backing, zeros) joined into one.
    fn runs(
        &self,
        start: u64,
        end: u64,
        mut each: impl FnMut(Piece, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut pos = start;
        let mut current: Option<(Piece, u64)> = None; // piece at run start, run start
        while pos < end {
            let (piece, piece_end) = self.piece_at(pos)?;
            let piece_end = piece_end.min(end);
            current = match current {
                Some((run, run_start)) if continues(run, run_start, piece, pos) => {
                    Some((run, run_start))
                }
                Some((run, run_start)) => {
                    each(run, run_start, pos)?;
                    Some((piece, pos))
                }
                None => Some((piece, pos)),
            };
            pos = piece_end;
        }
        if let Some((run, run_start)) = current {
            each(run, run_start, end)?;
        }
        Ok(())
    }

    /// The compressed cluster a descriptor names, decompressed (the last one is kept: a read
    /// that starts or ends inside a cluster asks for it twice).
    fn decompress(&self, descriptor: u64) -> io::Result<Arc<Vec<u8>>> {
        let mut cache = self.cluster_cache.lock().unwrap();
        if let Some((d, data)) = cache.as_ref() {
            if *d == descriptor {
                return Ok(data.clone());
            }
        }
        let mut out = vec![0u8; self.cluster_size() as usize];
        self.inflate_into(descriptor, &mut out)?;
        let data = Arc::new(out);
        *cache = Some((descriptor, data.clone()));
        Ok(data)
    }

    /// Decompresses the cluster a descriptor names into `out` (one cluster long).
    fn inflate_into(&self, descriptor: u64, out: &mut [u8]) -> io::Result<()> {
        let size_shift = 62 - (self.cluster_bits - 8);
        let offset = descriptor & ((1 << size_shift) - 1);
        let sectors = ((descriptor >> size_shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1;
        let stored = (sectors * 512 - (offset & 511)).min(self.file_len.saturating_sub(offset));
        let mut input = vec![0u8; stored as usize];
        let got = sparse::read_full_at(&self.file, &mut input, offset)?;
        input.truncate(got);
        let bad = |what: String| {
            io_corrupt(
                &self.path,
                format!("compressed cluster at {offset}: {what}"),
            )
        };
        match self.compression {
            Compression::Zlib => {
                // qcow2 stores raw deflate streams (no zlib header).
                let mut inflate = flate2::Decompress::new(false);
                inflate
                    .decompress(&input, out, flate2::FlushDecompress::Finish)
                    .map_err(|e| bad(e.to_string()))?;
                if inflate.total_out() != out.len() as u64 {
                    return Err(bad(format!(
                        "{} bytes instead of {}",
                        inflate.total_out(),
                        out.len()
                    )));
                }
            }
            Compression::Zstd => {
                let mut decoder = ruzstd::decoding::StreamingDecoder::new(&input[..])
                    .map_err(|e| bad(e.to_string()))?;
                decoder.read_exact(out).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Decompresses whole clusters into their places, on as many threads as there are cores
    /// (at most 4): inflating is what bounds a compressed image's import, and a read covers
    /// many clusters. QEMU decompresses on a thread pool too.
    fn inflate_all(&self, jobs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4)
            .min(jobs.len());
        if threads <= 1 {
            return jobs
                .iter_mut()
                .try_for_each(|(descriptor, out)| self.inflate_into(*descriptor, out));
        }
        let per_thread = jobs.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = jobs
                .chunks_mut(per_thread)
                .map(|share| {
                    scope.spawn(move || {
                        share
                            .iter_mut()
                            .try_for_each(|(descriptor, out)| self.inflate_into(*descriptor, out))
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|worker| worker.join().expect("an inflate thread panicked"))
        })
    }

    /// Fills `out` (guest bytes from `start`) from one run that is not a whole compressed
    /// cluster.
    fn read_run(&self, piece: Piece, start: u64, out: &mut [u8]) -> io::Result<()> {
        match piece {
            Piece::Zero => out.fill(0),
            Piece::Data(host) => {
                if sparse::read_full_at(&self.file, out, host)? != out.len() {
                    return Err(io_corrupt(
                        &self.path,
                        format!("data of guest offset {start} is past the end of the file"),
                    ));
                }
            }
            Piece::Compressed(descriptor, into) => {
                let data = self.decompress(descriptor)?;
                let into = into as usize;
                out.copy_from_slice(&data[into..into + out.len()]);
            }
            Piece::Backing => {
                let from_backing = self
                    .backing_size()
                    .saturating_sub(start)
                    .min(out.len() as u64) as usize;
                let (below, past) = out.split_at_mut(from_backing);
                if let Some(backing) = self.backing_source() {
                    let got = backing.read_full_at(below, start)?;
                    if got != below.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the backing file of {} ended early", self.path.display()),
                        ));
                    }
                }
                past.fill(0);
            }
        }
        Ok(())
    }

    fn backing_size(&self) -> u64 {
        match &self.backing {
            Backing::None => 0,
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(q) => q.size,
        }
    }

    fn backing_source(&self) -> Option<&dyn SparseSource> {
        match &self.backing {
            Backing::None => None,
            Backing::Raw { file, .. } => Some(file),
            Backing::Qcow2(q) => Some(q.as_ref()),
        }
    }
}

/// The length of a file or block device (whose `st_size` is 0): where its end is.
pub fn length(file: &File, path: &Path) -> Result<u64> {
    use std::io::Seek;
    let mut handle = file;
    handle
        .seek(io::SeekFrom::End(0))
        .map_err(|e| Error::io(format!("cannot read the size of {}", path.display()), e))
}

/// Whether `piece` at `pos` continues the run that began with `run` at `run_start`.
fn continues(run: Piece, run_start: u64, piece: Piece, pos: u64) -> bool {
    match (run, piece) {
        (Piece::Backing, Piece::Backing) | (Piece::Zero, Piece::Zero) => true,
        (Piece::Data(host), Piece::Data(next)) => host + (pos - run_start) == next,
        _ => false,
    }
}

/// The names the feature name table (if any) gives incompatible feature bits.
fn feature_names(head: &[u8], header_len: usize) -> Vec<(u32, String)> {
    let mut names = Vec::new();
    for (kind, data) in extensions(head, header_len) {
        if kind == EXT_FEATURE_NAMES {
            for entry in data.chunks_exact(48) {
                if entry[0] == 0 {
                    let name = entry[2..].split(|&b| b == 0).next().unwrap_or(&[]);
                    names.push((entry[1] as u32, String::from_utf8_lossy(name).into_owned()));
                }
            }
        }
    }
    names
}

fn backing_format(head: &[u8], header_len: usize) -> Option<String> {
    extensions(head, header_len)
        .into_iter()
        .find(|(kind, _)| *kind == EXT_BACKING_FORMAT)
        .map(|(_, data)| String::from_utf8_lossy(data).into_owned())
}

/// The header extensions that follow the header (within the bytes read), as (type, data).
fn extensions(head: &[u8], header_len: usize) -> Vec<(u32, &[u8])> {
    let mut found = Vec::new();
    let mut at = header_len;
    while at + 8 <= head.len() {
        let (kind, len) = (be32(head, at), be32(head, at + 4) as usize);
        if kind == EXT_END || at + 8 + len > head.len() {
            break;
        }
        found.push((kind, &head[at + 8..at + 8 + len]));
        at += 8 + len.div_ceil(8) * 8;
    }
    found
}

impl SparseSource for Qcow2 {
    /// The clusters stored in this file (not those that read as zeros), and where this file
    /// has none, the backing chain's extents.
    fn data_extents(&self, size: u64) -> io::Result<Vec<(u64, u64)>> {
        let end = size.min(self.size);
        let below = match self.backing_source() {
            Some(backing) => backing.data_extents(end.min(self.backing_size()))?,
            None => Vec::new(),
        };
        let mut below = below.into_iter().peekable();
        let mut extents: Vec<(u64, u64)> = Vec::new();
        let mut push = |start: u64, stop: u64| match extents.last_mut() {
            Some(last) if last.1 == start => last.1 = stop,
            _ => extents.push((start, stop)),
        };
        self.runs(0, end, |piece, start, stop| {
            match piece {
                Piece::Zero => {}
                Piece::Data(_) | Piece::Compressed(..) => push(start, stop),
                Piece::Backing => {
                    // The backing extents that overlap [start, stop), clipped to it.
                    while let Some(&(s, e)) = below.peek() {
                        if e <= start {
                            below.next();
                            continue;
                        }
                        if s >= stop {
                            break;
                        }
                        push(s.max(start), e.min(stop));
                        if e <= stop {
                            below.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(extents)
    }

    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let end = (offset + buf.len() as u64).min(self.size);
        let mut runs = Vec::new();
        self.runs(offset, end, |piece, start, stop| {
            runs.push((piece, start, stop));
            Ok(())
        })?;
        // Each run gets its own slice of `buf`; whole compressed clusters are inflated last,
        // together.
        let cluster = self.cluster_size();
        let mut rest = &mut buf[..(end - offset) as usize];
        let mut whole_clusters = Vec::new();
        for (piece, start, stop) in runs {
            let (out, tail) = std::mem::take(&mut rest).split_at_mut((stop - start) as usize);
            rest = tail;
            match piece {
                Piece::Compressed(descriptor, 0) if out.len() as u64 == cluster => {
                    whole_clusters.push((descriptor, out))
                }
                _ => self.read_run(piece, start, out)?,
            }
        }
        self.inflate_all(&mut whole_clusters)?;
        Ok((end - offset) as usize)
    }
}
