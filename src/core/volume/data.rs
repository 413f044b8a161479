//! The data file: written blocks in slots of one granule each, at `slot * GRANULE`. A slot holds
//! only the blocks its index row says it holds; the others are holes (the file is sparse), so a
//! slot costs disk space only for what was written.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};

use crate::format::volume::{BLOCK, GRANULE};

pub struct DataFile {
    file: File,
}

fn offset(slot: u64, block: u32) -> u64 {
    slot * GRANULE + u64::from(block) * BLOCK
}

impl DataFile {
    pub fn open(path: &Path, create: bool) -> io::Result<DataFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(DataFile { file })
    }

    /// Reads whole blocks from `block` on, `buf.len()` a multiple of `BLOCK`.
    pub fn read(&self, slot: u64, block: u32, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset(slot, block))
    }

    /// Writes whole blocks from `block` on.
    pub fn write(&self, slot: u64, block: u32, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset(slot, block))
    }

    /// Gives the disk space of `blocks` blocks from `block` back to the filesystem.
    pub fn punch(&self, slot: u64, block: u32, blocks: u32) -> io::Result<()> {
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset(slot, block) as i64,
            (u64::from(blocks) * BLOCK) as i64,
        )
        .map_err(io::Error::from)
    }

    /// Cuts the file at the end of slot `slots - 1`.
    pub fn truncate_to_slots(&self, slots: u64) -> io::Result<()> {
        self.file.set_len(slots * GRANULE)
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Starts writing what was written so far to the disk, without waiting (`start_writeback`).
    pub fn start_writeback(&self) -> io::Result<()> {
        crate::format::layout::start_writeback(&self.file)
    }

    /// Bytes of disk space the file uses.
    #[cfg(test)]
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}
