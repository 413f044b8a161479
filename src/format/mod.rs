//! What lies on a disk or comes from the kernel, and the plain helpers every layer shares. Nothing
//! here knows the metadata store or any policy.

pub mod clock;
pub mod digests;
pub mod layout;
pub mod locks;
pub mod longhorn;
pub mod mountinfo;
pub mod names;
pub mod qcow2;
pub mod sparse;
pub mod stream;
pub mod units;
pub mod volume;
