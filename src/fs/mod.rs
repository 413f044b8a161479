//! Serving the pool: `namespace` (the tree of views and the file operations, FUSE-free), `read`
//! (the read path: chunk reads checked against their digests, failover between copies,
//! readahead) over `cache` (the shared chunk cache), `volumes` (the read-write volume files over
//! `core::volume`), `fuse` (the thin kernel adapter), `ops` (its request counters) and `stats` (what a mount
//! reports).

pub mod cache;
pub mod fuse;
pub mod namespace;
pub mod ops;
pub mod read;
pub mod stats;
pub mod volumes;

/// How reads reach the data: through the daemon's chunk cache, or by the kernel straight from the
/// copy file (FUSE passthrough, Linux >= 6.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    Cached,
    Passthrough,
}
