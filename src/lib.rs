//! imgpool: a node-wide pool of read-only backing images, spread over the node's disks and
//! served through one FUSE mount at the paths where volume replicas expect them.
//!
//! Core (no FUSE): `pool` over `store` (metadata), `disk` (on-disk layout), `placement`,
//! `resources`, `sparse` (import data path), `owner` (liveness of work in progress).
//! Serving: `fs` (namespace and file operations), `read` (the read path), `fuse` (the thin
//! kernel adapter), `mount` (daemon lifecycle and bind mounts). Front end: `cli`.

pub mod cache;
pub mod cli;
pub mod digests;
pub mod disk;
pub mod error;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod health;
pub mod mount;
pub mod mountinfo;
pub mod names;
pub mod owner;
pub mod placement;
pub mod pool;
pub mod read;
pub mod repair;
pub mod resources;
pub mod settings;
pub mod sparse;
pub mod stats;
pub mod store;
