//! imgpool: a node-wide pool of read-only backing images, spread over the node's disks and
//! served through one FUSE mount at the paths where volume replicas expect them.
//!
//! The crate is layered; each layer uses only the layers above it in this list, and
//! `scripts/check-layers.py` (run by `scripts/test.sh`) fails the build when an import goes the
//! other way or modules form a cycle:
//!
//! - `error`: the error type every layer returns.
//! - `format`: what lies on a disk or comes from the kernel, and plain helpers (clock, units,
//!   names): no metadata store, no policy.
//! - `core`: the pool's rules over the metadata store and the disks: disks, images, copies,
//!   holders, placement, health, repair, fsck. No FUSE, no printing, no argument parsing.
//! - `fs`: serving the pool: the namespace, the read path with its chunk cache, and the thin FUSE
//!   adapter.
//! - `daemon`: the mount daemon's lifecycle: mounting, bind mounts, signals, background workers.
//! - `cli`: the command line, the only layer that prints, parses arguments or checks for root.
//!
//! `unsafe` is denied: every system call used has a safe wrapper in `nix` or std. The few items
//! that still need it carry `#[allow(unsafe_code)]` and a `SAFETY:` comment.
#![deny(unsafe_code)]

pub mod cli;
pub(crate) mod core;
pub(crate) mod daemon;
pub(crate) mod error;
pub(crate) mod format;
pub(crate) mod fs;
