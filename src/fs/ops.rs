//! Counts of the FUSE requests the adapter answers, by operation: how many, how many failed with
//! each errno, and how long each took (a histogram). Only atomics: a request adds to its
//! operation's counters with a few relaxed increments and takes no lock, and a reader (the
//! metrics endpoint) reads them without stopping anyone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The operations counted, in the order of `Op::ALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Setattr,
    Open,
    Read,
    Write,
    Lseek,
    Release,
    Flush,
    Fsync,
    Readdir,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
    Fallocate,
    /// Requests every one of which fails (`EROFS`): mknod, mkdir, unlink, rmdir, symlink,
    /// rename, link, create, setxattr, removexattr.
    Other,
}

impl Op {
    pub const ALL: [Op; 17] = [
        Op::Lookup,
        Op::Getattr,
        Op::Setattr,
        Op::Open,
        Op::Read,
        Op::Write,
        Op::Lseek,
        Op::Release,
        Op::Flush,
        Op::Fsync,
        Op::Readdir,
        Op::Statfs,
        Op::Getxattr,
        Op::Listxattr,
        Op::Access,
        Op::Fallocate,
        Op::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Lseek => "lseek",
            Op::Release => "release",
            Op::Flush => "flush",
            Op::Fsync => "fsync",
            Op::Readdir => "readdir",
            Op::Statfs => "statfs",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Access => "access",
            Op::Fallocate => "fallocate",
            Op::Other => "other",
        }
    }
}

/// Upper bounds of the latency buckets, in seconds: 10 µs to 10 s, three per decade (1, 2.5 and
/// 5 ×): a cache hit answers in microseconds, a disk read in milliseconds, a hung disk in seconds.
pub const LATENCY_BOUNDS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The bounds in nanoseconds, for the request path (integers, no float work).
const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Errnos counted one by one; a larger one (none is, on Linux) counts as `MAX_ERRNO`.
const MAX_ERRNO: usize = 134;

struct OpCounters {
    /// Requests in each latency bucket (not cumulative); the last one is over every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    nanos: AtomicU64,
    /// Failed requests, by errno.
    errors: [AtomicU64; MAX_ERRNO + 1],
}

impl OpCounters {
    fn new() -> OpCounters {
        OpCounters {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            nanos: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The counters of every operation.
pub struct OpStats {
    ops: Vec<OpCounters>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            ops: Op::ALL.iter().map(|_| OpCounters::new()).collect(),
        }
    }
}

/// One operation's figures, as read at one moment.
#[derive(Debug, Clone)]
pub struct OpSnapshot {
    pub op: Op,
    pub count: u64,
    /// Seconds spent answering, summed.
    pub seconds: f64,
    /// `(upper bound, requests)` of each bucket (not cumulative): the `LATENCY_BOUNDS`, then
    /// infinity.
    pub buckets: Vec<(f64, u64)>,
    /// `(errno, requests)` for each errno seen.
    pub errors: Vec<(i32, u64)>,
}

impl OpStats {
    /// Starts timing one request of `op`; it is counted when the returned value is dropped.
    pub fn start(&self, op: Op) -> Timed<'_> {
        Timed {
            counters: &self.ops[op as usize],
            started: Instant::now(),
        }
    }

    pub fn snapshot(&self) -> Vec<OpSnapshot> {
        Op::ALL
            .iter()
            .map(|&op| {
                let c = &self.ops[op as usize];
                let buckets: Vec<(f64, u64)> = c
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, bucket)| {
                        let bound = LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
                        (bound, bucket.load(Ordering::Relaxed))
                    })
                    .collect();
                let total = buckets.iter().map(|(_, n)| n).sum();
                let errors = c
                    .errors
                    .iter()
                    .enumerate()
                    .map(|(errno, n)| (errno as i32, n.load(Ordering::Relaxed)))
                    .filter(|&(_, n)| n > 0)
                    .collect();
                OpSnapshot {
                    op,
                    count: total,
                    seconds: c.nanos.load(Ordering::Relaxed) as f64 / 1e9,
                    buckets,
                    errors,
                }
            })
            .collect()
    }
}

/// A request being timed.
pub struct Timed<'a> {
    counters: &'a OpCounters,
    started: Instant,
}

impl Timed<'_> {
    /// Counts the request as failed with `errno`, and gives it back (for the reply).
    pub fn failed<E: Into<i32> + Copy>(&self, errno: E) -> E {
        let code = errno.into().clamp(0, MAX_ERRNO as i32) as usize;
        self.counters.errors[code].fetch_add(1, Ordering::Relaxed);
        errno
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        let nanos = self.started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let bucket = BOUNDS_NS.partition_point(|&bound| bound < nanos);
        self.counters.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.counters.nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// An errno's symbolic name (`EIO`), or its number for one without a name here.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::ENOTCONN => "ENOTCONN",
        _ => return errno.to_string(),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_bucket_and_errors_by_errno() {
        let stats = OpStats::default();
        {
            let t = stats.start(Op::Read);
            assert_eq!(t.failed(libc::EIO), libc::EIO);
        }
        drop(stats.start(Op::Read));
        drop(stats.start(Op::Lookup));
        let snap = stats.snapshot();
        let read = snap.iter().find(|s| s.op == Op::Read).unwrap();
        assert_eq!(read.count, 2);
        assert_eq!(read.errors, vec![(libc::EIO, 1)]);
        assert_eq!(read.buckets.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(read.buckets.last().unwrap().0, f64::INFINITY);
        assert_eq!(read.buckets.iter().map(|(_, n)| n).sum::<u64>(), 2);
        let write = snap.iter().find(|s| s.op == Op::Write).unwrap();
        assert_eq!(write.count, 0);
        assert_eq!(BOUNDS_NS.len(), LATENCY_BOUNDS.len());
        for (ns, s) in BOUNDS_NS.iter().zip(LATENCY_BOUNDS) {
            assert_eq!(*ns, (s * 1e9).round() as u64);
        }
    }
}
