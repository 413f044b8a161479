//! The pool's rules, over the metadata store (`store`) and the disks (`format::layout`): disks,
//! images, copies and their states, holders, placement, health, repair, fsck and recovery. The
//! CLI and the mount daemon drive the pool through this layer; tests drive it directly, without
//! FUSE.
//!
//! `copies` (the copy state machine), `state` and `placement` are private to this layer: the
//! layers above change copies only through `Pool`, and see the states through `store`.

mod copies;
pub mod copy_plan;
pub(crate) mod crash_point;
pub mod fsck;
pub mod health;
pub mod ingest;
pub mod owner;
mod placement;
pub mod pool;
pub mod recover;
pub mod repair;
pub mod resources;
pub mod settings;
mod state;
pub mod store;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod volume;
