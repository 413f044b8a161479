//! The mount daemon: mounting the pool, the per-disk bind mounts, following changes made by other
//! commands, the background workers (health, repair) and a clean stop.

pub mod mount;
