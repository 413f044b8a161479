//! The FUSE adapter: maps kernel requests onto `PoolFs` calls and results onto replies. No pool
//! logic lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::fs::namespace::{Attr, Kind, PoolFs};
use crate::fs::ops::{Op, OpStats};
use crate::fs::IoMode;

/// How long the kernel may trust a name or attribute. Removals are also pushed to the kernel
/// (see `mount.rs`), so this bounds only how late a change made behind our back shows.
const TTL: Duration = Duration::from_secs(1);
const BLOCK_SIZE: u32 = 4096;
/// Background requests (readahead, async O_DIRECT) the kernel may have in flight: enough for
/// an engine reading at queue depth 32 plus readahead.
const MAX_BACKGROUND: u16 = 64;

/// Kernel passthrough state: one backing id per image inode, shared by all its open files
/// (the kernel refuses two different backing files for one inode), with the copy it reads.
#[derive(Default)]
struct Backing {
    by_ino: HashMap<u64, (PathBuf, Weak<BackingId>)>,
    by_handle: HashMap<u64, Arc<BackingId>>,
}

/// How one open file of an image is served in passthrough mode.
enum PassthroughOpen {
    Kernel(Arc<BackingId>),
    /// The inode's backing is a copy that stopped serving between the open's check and now:
    /// the kernel takes no second backing file for an inode, so the open is refused with
    /// ESTALE and the kernel looks the name up again (a new inode, see `Node::Backing`).
    Stale,
    /// The kernel refused a backing file: served cached.
    Cached,
}

pub struct FuseAdapter {
    fs: Arc<PoolFs>,
    requested: IoMode,
    /// Whether the kernel agreed to passthrough; decided at init.
    passthrough: Arc<AtomicBool>,
    /// Set when the kernel refused a backing file: later opens are served cached, quietly.
    backing_refused: AtomicBool,
    backing: Mutex<Backing>,
    /// Requests answered, by operation (the metrics' source).
    ops: Arc<OpStats>,
}

impl FuseAdapter {
    /// `passthrough` reports the mode the kernel agreed to, once the session has started.
    pub fn new(
        fs: Arc<PoolFs>,
        requested: IoMode,
        passthrough: Arc<AtomicBool>,
        ops: Arc<OpStats>,
    ) -> Self {
        FuseAdapter {
            ops,
            fs,
            requested,
            passthrough,
            backing_refused: AtomicBool::new(false),
            backing: Mutex::default(),
        }
    }

    /// How to serve a new open file `fh` of `ino`, whose serving copy is `path`: with the
    /// inode's live backing id if it reads that copy, or a new one registered with the kernel.
    /// Decided and recorded under one lock, so that concurrent opens of an inode agree and a
    /// release racing the reply finds the handle.
    fn backing_for(
        &self,
        ino: u64,
        fh: u64,
        reply: &ReplyOpen,
        file: &File,
        path: PathBuf,
    ) -> PassthroughOpen {
        let mut backing = self.backing.lock();
        let live = backing
            .by_ino
            .get(&ino)
            .and_then(|(copy, id)| Some((copy.clone(), id.upgrade()?)));
        let id = match live {
            Some((copy, id)) if copy == path => id,
            Some(_) => return PassthroughOpen::Stale,
            None if self.backing_refused.load(Ordering::Relaxed) => return PassthroughOpen::Cached,
            None => match reply.open_backing(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    backing.by_ino.insert(ino, (path, Arc::downgrade(&id)));
                    id
                }
                Err(e) => {
                    self.backing_refused.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        "kernel refused a passthrough backing file ({e}): images opened from now on are served in cached mode"
                    );
                    return PassthroughOpen::Cached;
                }
            },
        };
        backing.by_handle.insert(fh, id.clone());
        PassthroughOpen::Kernel(id)
    }

    /// Answers an open of an image in passthrough mode.
    fn open_passthrough(&self, ino: u64, fh: u64, file: File, path: PathBuf, reply: ReplyOpen) {
        match self.backing_for(ino, fh, &reply, &file, path) {
            PassthroughOpen::Kernel(id) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
            }
            PassthroughOpen::Stale => {
                self.fs.release(fh);
                reply.error(Errno::from_i32(libc::ESTALE))
            }
            PassthroughOpen::Cached => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }
}

/// Asks the kernel for passthrough; the reason when it cannot have it.
fn enable_passthrough(config: &mut KernelConfig) -> Result<(), String> {
    config
        .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
        .map_err(|_| "the kernel does not offer FUSE passthrough (needs Linux 6.9 or later)")?;
    // Copies sit on plain filesystems (depth 0); depth 1 still lets overlayfs stack on us.
    config
        .set_max_stack_depth(1)
        .map_err(|max| format!("the kernel's stacking limit is {max}"))?;
    Ok(())
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: attr.mtime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Directory => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}

/// Why `req` may not write `ino`, if it may not: only volumes are writable, and only by root
/// (they are root's, mode 0644). The mount has no `default_permissions`: this is the check.
fn write_denied(req: &Request, fs: &PoolFs, ino: u64) -> Option<Errno> {
    if !fs.writable(ino) {
        Some(Errno::EROFS)
    } else if req.uid() != 0 {
        Some(Errno::EACCES)
    } else {
        None
    }
}

/// Opens that could modify the file: write access, or truncation.
fn wants_write(flags: OpenFlags) -> bool {
    flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Without ASYNC_DIO the kernel sends an O_DIRECT reader's requests one at a time, so
        // an engine reading with io_uring/libaio at queue depth 32 waits on each in turn.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::info!("kernel lacks {missing:?}: O_DIRECT reads are served one at a time");
        }
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP) {
            tracing::info!("kernel lacks {missing:?}");
        }
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            tracing::info!("kernel limits background requests to {nearest}");
        }
        if self.requested == IoMode::Passthrough {
            match enable_passthrough(config) {
                Ok(()) => {
                    self.passthrough.store(true, Ordering::Relaxed);
                    self.fs.use_inode_per_copy();
                }
                Err(why) => tracing::warn!("{why}: serving reads in cached mode"),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = self.ops.start(Op::Lookup);
        match self.fs.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let t = self.ops.start(Op::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let t = self.ops.start(Op::Open);
        let write = wants_write(flags);
        if write && self.fs.writable(ino.0) {
            if let Some(e) = write_denied(req, &self.fs, ino.0) {
                return reply.error(t.failed(e));
            }
        }
        let fh = match self.fs.open(ino.0, write) {
            Ok(fh) => fh,
            Err(e) => return reply.error(t.failed(errno(e))),
        };
        if self.passthrough.load(Ordering::Relaxed) {
            match self.fs.backing_file(fh) {
                Some(Ok((file, path))) => {
                    return self.open_passthrough(ino.0, fh, file, path, reply)
                }
                Some(Err(e)) => {
                    self.fs.release(fh);
                    return reply.error(t.failed(errno(e.raw_os_error().unwrap_or(libc::EIO))));
                }
                None => {}
            }
        }
        if self.fs.writable(ino.0) {
            // A volume's pages are dropped at each open: a rollback may have changed it.
            // An O_DIRECT opener (a VM's disk, an engine at queue depth) gets the kernel's
            // direct path, whose writes run in parallel; without FOPEN_DIRECT_IO the kernel
            // sends O_DIRECT writes one at a time under the inode lock. Buffered openers keep
            // the page cache, which their reads need (decisions: "Volumes: serving them").
            let direct = if flags.0 & libc::O_DIRECT != 0 {
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
            } else {
                FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
            };
            return reply.opened(FileHandle(fh), direct);
        }
        if self.fs.may_change(ino.0) {
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
        }
        // Images and snapshots never change (a snapshot's inode is never another's), so the
        // kernel may keep their pages across opens.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = self.ops.start(Op::Read);
        // The kernel keeps what it reads for anything but an O_DIRECT file.
        let to_page_cache = flags.0 & libc::O_DIRECT == 0;
        match self.fs.read(fh.0, offset, size, to_page_cache) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    /// The kernel asks only for `SEEK_DATA` and `SEEK_HOLE`; it moves the position itself for
    /// the other kinds.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let t = self.ops.start(Op::Lseek);
        let hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            _ => return reply.error(t.failed(Errno::EINVAL)),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(t.failed(Errno::ENXIO));
        };
        match self.fs.seek(fh.0, offset, hole) {
            Ok(found) => reply.offset(found as i64),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _t = self.ops.start(Op::Release);
        self.fs.release(fh.0);
        let mut backing = self.backing.lock();
        if let Some(id) = backing.by_handle.remove(&fh.0) {
            // The inode's last open file: the kernel no longer needs the backing id.
            if Arc::strong_count(&id) == 1 {
                backing.by_ino.remove(&ino.0);
            }
        }
        drop(backing);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _t = self.ops.start(Op::Flush);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.ops.start(Op::Fsync);
        match self.fs.fsync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let t = self.ops.start(Op::Readdir);
        let entries = match self.fs.readdir(ino.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(t.failed(errno(e))),
        };
        for entry in &entries {
            if reply.add(
                INodeNo(entry.ino),
                entry.cookie,
                file_type(entry.kind),
                &entry.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _t = self.ops.start(Op::Statfs);
        let stats = self.fs.statfs();
        let bsize = BLOCK_SIZE as u64;
        reply.statfs(
            stats.capacity / bsize,
            stats.free / bsize,
            stats.free / bsize,
            stats.files,
            0,
            BLOCK_SIZE,
            255,
            BLOCK_SIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let t = self.ops.start(Op::Getxattr);
        match self.fs.getxattr(ino.0, name) {
            Ok(value) => reply_xattr(reply, size, &value),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let t = self.ops.start(Op::Listxattr);
        match self.fs.listxattr(ino.0) {
            Ok(names) => {
                let mut list = Vec::new();
                for name in names {
                    list.extend_from_slice(name.as_bytes());
                    list.push(0);
                }
                reply_xattr(reply, size, &list);
            }
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let t = self.ops.start(Op::Access);
        match self.fs.getattr(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => match write_denied(req, &self.fs, ino.0) {
                Some(e) => reply.error(t.failed(e)),
                None => reply.ok(),
            },
            // Everything is readable by all, every directory searchable.
            Ok(_) => reply.ok(),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    // Everything that would change the pool through the mount is refused: images change only
    // through `imgpool image add/rm`, and only the content of volumes is written here.

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = self.ops.start(Op::Setattr);
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(t.failed(Errno::EROFS));
        }
        if let Some(e) = write_denied(req, &self.fs, ino.0) {
            return reply.error(t.failed(e));
        }
        // Times are not kept; a size change is refused unless it changes nothing.
        let attr = match size {
            Some(size) => self.fs.set_size(ino.0, size),
            None => self.fs.getattr(ino.0),
        };
        match attr {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let t = self.ops.start(Op::Write);
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let t = self.ops.start(Op::Other);
        reply.error(t.failed(Errno::EROFS));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let t = self.ops.start(Op::Fallocate);
        match self.fs.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(t.failed(errno(e))),
        }
    }

    fn destroy(&mut self) {
        self.fs.shutdown();
    }
}

/// getxattr/listxattr protocol: size 0 asks for the length, a short buffer is ERANGE.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
