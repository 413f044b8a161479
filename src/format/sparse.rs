//! Sparse-aware copying with a running SHA-512 and chunk digests: the data path of import, of
//! copy redistribution and of verification (which only hashes). Holes in the source are found with SEEK_DATA/SEEK_HOLE and skipped; all-zero
//! blocks inside data are not written either. The digest covers the whole logical content,
//! holes included, so it equals `sha512sum` of the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha512};

use crate::error::CopyError;
use crate::format::digests::{ChunkDigests, ChunkHasher};

/// The unit of hole detection inside data extents: a filesystem block.
pub const BLOCK: usize = 4096;
const BUF: usize = 1 << 20;
/// Pieces read ahead of the hashing.
const DEPTH: usize = 4;

/// A piece of the source, read (and written, if asked) by the reading stage.
struct Piece {
    pos: u64,
    len: usize,
    buf: Vec<u8>,
}

/// Reads `buf.len()` bytes of `from` at `pos` and writes their non-zero blocks to `copy_to`,
/// if any. `from` is the source, or (`from_target`) the target itself, read back to hash what a
/// resumed copy holds, whose failures are the target's.
fn read_piece(
    from: &dyn SparseSource,
    from_target: bool,
    copy_to: Option<&File>,
    buf: &mut [u8],
    pos: u64,
    size: u64,
) -> Result<usize, CopyError> {
    let n = from.read_full_at(buf, pos).map_err(|e| match from_target {
        false => CopyError::SourceRead(e),
        true => CopyError::target(e),
    })?;
    if n == 0 {
        return Err(CopyError::SourceRead(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("source ended at byte {pos}, expected {size} bytes"),
        )));
    }
    if let Some(dst) = copy_to {
        write_nonzero_blocks(dst, &buf[..n], pos).map_err(CopyError::target)?;
    }
    Ok(n)
}
static ZEROS: [u8; BUF] = [0; BUF];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Hex SHA-512 of the whole logical content, when the copy was asked to compute it.
    pub sha512: Option<String>,
    /// The digest of each chunk of the logical content.
    pub chunks: ChunkDigests,
}

/// What an image is made from: bytes at offsets, and where the data is (the rest reads as
/// zeros). A file is one; so are a volume at a snapshot and the formats images arrive in.
pub trait SparseSource: Sync {
    /// The data extents below `size`, as sorted, disjoint (start, end) byte ranges. An extent
    /// may hold zeros; what is outside every extent is zeros.
    fn data_extents(&self, size: u64) -> io::Result<Vec<(u64, u64)>>;
    /// Reads until `buf` is full or the source ends; returns the bytes read.
    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl SparseSource for File {
    fn data_extents(&self, size: u64) -> io::Result<Vec<(u64, u64)>> {
        data_extents(self, size)
    }

    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        read_full_at(self, buf, offset)
    }
}

/// The data extents of `file` below `size`, as (start, end) byte ranges. Filesystems without
/// SEEK_DATA support report the whole file as one extent.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(data) => data as u64,
            Err(Errno::ENXIO) => break, // only a hole is left
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) if pos == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = lseek(file, data as i64, Whence::SeekHole)?;
        let end = (hole as u64).min(size);
        extents.push((data, end));
        pos = end;
    }
    Ok(extents)
}

/// Copies the first `size` bytes of `src` into `dst` (which must be empty), leaving holes where
/// the source has holes or all-zero blocks; without `dst`, only hashes. The SHA-512 of the
/// whole content is computed only when `with_sha512` (it is the slowest part: one serial chain
/// over every byte, holes included). After each read,
/// `progress` is told how many logical bytes are done and how many were just read; an error it
/// returns ends the copy (a stop). A failure says its side: reading `src` (`SourceRead`) or
/// writing `dst` (`TargetWrite`, or `NoSpace`).
pub fn copy_sparse(
    src: &dyn SparseSource,
    dst: Option<&File>,
    size: u64,
    chunk_size: u64,
    with_sha512: bool,
    progress: &mut dyn FnMut(u64, usize) -> Result<(), CopyError>,
) -> Result<CopyOutcome, CopyError> {
    resume_sparse(src, dst, 0, size, chunk_size, with_sha512, progress)
}

/// `copy_sparse` into a `dst` that already holds the first `done` bytes of `src` (a copy
/// interrupted after it made them durable): those are hashed from `dst`, and only the rest is
/// read from `src`. A read of `dst` that fails is a `TargetWrite` failure.
pub fn resume_sparse(
    src: &dyn SparseSource,
    dst: Option<&File>,
    done: u64,
    size: u64,
    chunk_size: u64,
    with_sha512: bool,
    progress: &mut dyn FnMut(u64, usize) -> Result<(), CopyError>,
) -> Result<CopyOutcome, CopyError> {
    let mut hasher = with_sha512.then(Sha512::new);
    let mut hashed = 0u64;

    let hash_zeros_to = |hasher: &mut Option<Sha512>, hashed: &mut u64, to: u64| {
        let Some(hasher) = hasher else {
            *hashed = to;
            return;
        };
        while *hashed < to {
            let n = (to - *hashed).min(BUF as u64) as usize;
            hasher.update(&ZEROS[..n]);
            *hashed += n as u64;
        }
    };

    let done = done.min(size);
    // What `dst` holds already, then the rest from `src`: (reader, start, end, write it).
    let mut passes: Vec<(&dyn SparseSource, u64, u64, bool)> = Vec::new();
    if let (Some(dst), true) = (dst, done > 0) {
        for (start, end) in dst.data_extents(done).map_err(CopyError::target)? {
            passes.push((dst, start, end.min(done), false));
        }
    }
    for (start, end) in src.data_extents(size).map_err(CopyError::SourceRead)? {
        if end > done {
            passes.push((src, start.max(done), end, true));
        }
    }
    // Two stages, so that the disks and the SHA-512 (the slowest part: no CPU instruction for
    // it here) work at once: a thread reads each piece, writes its non-zero blocks and takes
    // its chunk digests; this one runs the SHA-512 over the pieces in order. Buffers go round.
    let chunks = std::thread::scope(|scope| {
        let (full, pieces) = std::sync::mpsc::sync_channel::<Result<Piece, CopyError>>(DEPTH);
        let (give_back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        let reader = scope.spawn(move || {
            let mut chunks = ChunkHasher::new(chunk_size);
            let mut digested = 0u64;
            for (from, start, end, write) in passes {
                let mut pos = start;
                while pos < end {
                    let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0u8; BUF]);
                    let want = (end - pos).min(BUF as u64) as usize;
                    let piece = read_piece(
                        from,
                        !write,
                        dst.filter(|_| write),
                        &mut buf[..want],
                        pos,
                        size,
                    )
                    .map(|len| Piece { pos, len, buf });
                    let failed = piece.is_err();
                    if let Ok(piece) = &piece {
                        chunks.update_zeros(pos - digested);
                        chunks.update(&piece.buf[..piece.len]);
                        pos += piece.len as u64;
                        digested = pos;
                    }
                    // Gone: the hashing stage stopped (an error, or the copy was stopped).
                    if full.send(piece).is_err() || failed {
                        return None;
                    }
                }
            }
            chunks.update_zeros(size - digested);
            Some(chunks)
        });
        for piece in pieces {
            let Piece { pos, len, buf } = piece?;
            hash_zeros_to(&mut hasher, &mut hashed, pos);
            if let Some(hasher) = &mut hasher {
                hasher.update(&buf[..len]);
            }
            hashed = pos + len as u64;
            progress(hashed, len)?;
            let _ = give_back.send(buf);
        }
        // Every piece came: the reader finished, with the digests.
        Ok::<_, CopyError>(
            reader
                .join()
                .ok()
                .flatten()
                .expect("the reader ended with its pieces"),
        )
    })?;
    hash_zeros_to(&mut hasher, &mut hashed, size);
    if let Some(dst) = dst {
        dst.set_len(size).map_err(CopyError::target)?;
    }
    progress(size, 0)?;
    Ok(CopyOutcome {
        sha512: hasher.map(|h| hex::encode(h.finalize())),
        chunks: chunks.finish(),
    })
}

/// Writes the runs of non-zero blocks of `chunk` (which sits at `offset`); returns bytes written.
fn write_nonzero_blocks(dst: &File, chunk: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0;
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at <= chunk.len() {
        let block = &chunk[at..(at + BLOCK).min(chunk.len())];
        let zero = block.is_empty() || block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(start)) => {
                dst.write_all_at(&chunk[start..at], offset + start as u64)?;
                written += (at - start) as u64;
                run_start = None;
            }
            _ => {}
        }
        if block.is_empty() {
            break;
        }
        at += block.len();
    }
    Ok(written)
}

/// `pread` until `buf` is full or the file ends; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sha512_hex(bytes: &[u8]) -> String {
        hex::encode(Sha512::digest(bytes))
    }

    /// A copy stopped anywhere and resumed into what it wrote ends as the whole copy would:
    /// same bytes, same SHA-512 and chunk digests, and the part already written is not read
    /// from the source again.
    #[test]
    fn a_resumed_copy_equals_a_whole_one_and_reads_only_the_rest() {
        struct Counted<'a>(&'a File, std::sync::atomic::AtomicU64);
        impl SparseSource for Counted<'_> {
            fn data_extents(&self, size: u64) -> io::Result<Vec<(u64, u64)>> {
                self.0.data_extents(size)
            }
            fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                self.1
                    .fetch_min(offset, std::sync::atomic::Ordering::Relaxed);
                self.0.read_full_at(buf, offset)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = 9 << 20;
        let open = |name: &str| {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let src = open("src");
        src.set_len(size).unwrap();
        for (i, at) in [0u64, 3 << 20, (5 << 20) + 12_345, size - 5000]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..700_000usize).map(|j| (j % 249 + i + 1) as u8).collect();
            let len = (data.len() as u64).min(size - at) as usize;
            src.write_all_at(&data[..len], at).unwrap();
        }
        let whole_dst = open("whole");
        let whole = copy_sparse(&src, Some(&whole_dst), size, 64 << 10, true, &mut |_, _| {
            Ok(())
        })
        .unwrap();
        for stop in [1u64 << 20, (3 << 20) + 4096, 6 << 20] {
            let dst = open(&format!("part-{stop}"));
            let path = dir.path().join(format!("part-{stop}"));
            let stopped = copy_sparse(&src, Some(&dst), size, 64 << 10, true, &mut |done, _| {
                if done >= stop {
                    Err(CopyError::Stopped)
                } else {
                    Ok(())
                }
            });
            assert!(stopped.is_err());
            let counted = Counted(&src, std::sync::atomic::AtomicU64::new(u64::MAX));
            let resumed = resume_sparse(
                &counted,
                Some(&dst),
                stop,
                size,
                64 << 10,
                true,
                &mut |_, _| Ok(()),
            )
            .unwrap();
            assert_eq!(resumed, whole, "resumed at {stop}");
            assert!(
                counted.1.load(std::sync::atomic::Ordering::Relaxed) >= stop,
                "resumed at {stop} but read the source at {}",
                counted.1.load(std::sync::atomic::Ordering::Relaxed)
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(dir.path().join("whole")).unwrap()
            );
        }
    }

    #[test]
    fn copies_bytes_and_skips_holes_and_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = 64 << 20;
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        src.set_len(size).unwrap();
        let data: Vec<u8> = (0..3 * BLOCK).map(|i| (i % 251 + 1) as u8).collect();
        src.write_all_at(&data, 8 << 20).unwrap();
        // An explicitly written zero block: data on disk, but nothing to copy.
        src.write_all_at(&[0u8; BLOCK], 20 << 20).unwrap();
        src.write_all_at(b"tail", size - 4).unwrap();
        src.sync_all().unwrap();

        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        let mut last = 0;
        let outcome = copy_sparse(
            &File::open(&src_path).unwrap(),
            Some(&dst),
            size,
            64 << 10,
            true,
            &mut |p, _| {
                last = p;
                Ok(())
            },
        )
        .unwrap();
        dst.sync_all().unwrap();

        let copied = std::fs::read(&dst_path).unwrap();
        let original = std::fs::read(&src_path).unwrap();
        assert!(copied == original, "copy differs from source");
        assert_eq!(outcome.sha512, Some(sha512_hex(&original)));
        let mut chunks = ChunkHasher::new(64 << 10);
        chunks.update(&original);
        assert_eq!(outcome.chunks, chunks.finish());
        assert_eq!(last, size);
        let allocated = std::fs::metadata(&dst_path).unwrap().blocks() * 512;
        assert!(
            allocated <= 64 * 1024,
            "destination not sparse: {allocated} bytes"
        );
    }

    #[test]
    fn a_source_that_does_not_read_and_a_target_that_does_not_write_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, vec![7u8; 100_000]).unwrap();
        let dst_path = dir.path().join("dst");
        File::create(&dst_path).unwrap();
        let mut go_on = |_, _| Ok(());

        // A source whose reads fail (a descriptor open for writing only: EBADF).
        let unreadable = std::fs::OpenOptions::new()
            .write(true)
            .open(&src_path)
            .unwrap();
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .open(&dst_path)
            .unwrap();
        match copy_sparse(&unreadable, Some(&dst), 100_000, 64 << 10, true, &mut go_on) {
            Err(CopyError::SourceRead(e)) => assert_eq!(e.raw_os_error(), Some(libc::EBADF)),
            other => panic!("expected a source read error, got {other:?}"),
        }

        // A target whose writes fail (a descriptor open for reading only: EBADF).
        let unwritable = File::open(&dst_path).unwrap();
        let src = File::open(&src_path).unwrap();
        match copy_sparse(&src, Some(&unwritable), 100_000, 64 << 10, true, &mut go_on) {
            Err(CopyError::TargetWrite(e)) => assert_eq!(e.raw_os_error(), Some(libc::EBADF)),
            other => panic!("expected a target write error, got {other:?}"),
        }

        // A stop asked for by the progress callback ends the copy as `Stopped`.
        let stopped = copy_sparse(&src, None, 100_000, 64 << 10, true, &mut |_, _| {
            Err(CopyError::Stopped)
        });
        assert!(matches!(stopped, Err(CopyError::Stopped)), "{stopped:?}");
    }

    #[test]
    fn extents_of_a_dense_and_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let dense = dir.path().join("dense");
        std::fs::write(&dense, vec![1u8; 10_000]).unwrap();
        let extents = data_extents(&File::open(&dense).unwrap(), 10_000).unwrap();
        assert_eq!(extents.first().unwrap().0, 0);
        assert_eq!(extents.last().unwrap().1, 10_000);

        let empty = dir.path().join("empty");
        let f = File::create(&empty).unwrap();
        f.set_len(1 << 20).unwrap();
        assert!(data_extents(&f, 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn only_nonzero_blocks_are_written_including_a_short_tail() {
        let dir = tempfile::tempdir().unwrap();
        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        let mut chunk = vec![0u8; 3 * BLOCK + 10];
        chunk[0] = 1; // block 0
        chunk[2 * BLOCK + 5] = 2; // block 2
        chunk[3 * BLOCK + 9] = 3; // the 10-byte tail
        let written = write_nonzero_blocks(&dst, &chunk, 0).unwrap();
        assert_eq!(written, (BLOCK + BLOCK + 10) as u64);
        assert_eq!(std::fs::read(&dst_path).unwrap(), chunk);
    }
}
