//! The read path: every byte served through the mount comes through `ReadPath::read`. This is
//! the one place where the chunk cache sits (issue: fast reads) and where a read that fails on
//! one copy will fail over to another (issue: disk failure). Today it reads the first healthy
//! copy that opens.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::sparse::read_full_at;

/// Where one copy of an image lives.
#[derive(Debug, Clone)]
pub struct CopyLocation {
    pub path: PathBuf,
    pub healthy: bool,
}

#[derive(Default)]
pub struct ReadPath {
    /// One open descriptor per image, shared by every open file of every view.
    open_copies: Mutex<HashMap<i64, Arc<File>>>,
}

impl ReadPath {
    /// Reads up to `len` bytes at `offset` of image `image_id` (of `size` bytes); short only at
    /// the end of the image.
    pub fn read(
        &self,
        image_id: i64,
        size: u64,
        copies: &[CopyLocation],
        offset: u64,
        len: u32,
    ) -> io::Result<Vec<u8>> {
        if offset >= size {
            return Ok(Vec::new());
        }
        let len = (len as u64).min(size - offset) as usize;
        let file = self.copy_file(image_id, copies)?;
        let mut buf = vec![0u8; len];
        let n = read_full_at(&file, &mut buf, offset)?;
        if n < len {
            // The copy is shorter than the image: never pad with invented zeros.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(buf)
    }

    /// Checks that some copy of the image can be opened (done at open time, so that a missing
    /// copy fails the open rather than the first read).
    pub fn ensure_open(&self, image_id: i64, copies: &[CopyLocation]) -> io::Result<()> {
        self.copy_file(image_id, copies).map(|_| ())
    }

    /// Drops the descriptor of an image that left the pool.
    pub fn forget(&self, image_id: i64) {
        self.open_copies.lock().remove(&image_id);
    }

    fn copy_file(&self, image_id: i64, copies: &[CopyLocation]) -> io::Result<Arc<File>> {
        if let Some(file) = self.open_copies.lock().get(&image_id) {
            return Ok(file.clone());
        }
        let mut last_error = io::Error::from_raw_os_error(libc::EIO);
        for copy in copies.iter().filter(|c| c.healthy) {
            match File::open(&copy.path) {
                Ok(file) => {
                    let file = Arc::new(file);
                    self.open_copies
                        .lock()
                        .entry(image_id)
                        .or_insert_with(|| file.clone());
                    return Ok(file);
                }
                Err(e) => {
                    tracing::warn!("cannot open copy {}: {e}", copy.path.display());
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(path: PathBuf, healthy: bool) -> CopyLocation {
        CopyLocation { path, healthy }
    }

    #[test]
    fn reads_are_clipped_at_the_end_of_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, b"0123456789").unwrap();
        let reader = ReadPath::default();
        let copies = [copy(path, true)];
        assert_eq!(reader.read(1, 10, &copies, 2, 4).unwrap(), b"2345");
        assert_eq!(reader.read(1, 10, &copies, 8, 100).unwrap(), b"89");
        assert!(reader.read(1, 10, &copies, 10, 4).unwrap().is_empty());
        assert!(reader.read(1, 10, &copies, 50, 4).unwrap().is_empty());
    }

    #[test]
    fn unhealthy_or_missing_copies_are_skipped_and_short_copies_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, b"abcdef").unwrap();
        let wrong = dir.path().join("wrong");
        std::fs::write(&wrong, b"XXXXXX").unwrap();
        let reader = ReadPath::default();
        let copies = [
            copy(wrong, false),
            copy(dir.path().join("missing"), true),
            copy(good.clone(), true),
        ];
        assert_eq!(reader.read(1, 6, &copies, 0, 6).unwrap(), b"abcdef");

        let short = [copy(good, true)];
        let err = reader.read(2, 100, &short, 0, 50).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(reader.read(3, 6, &[], 0, 1).is_err());
    }
}
