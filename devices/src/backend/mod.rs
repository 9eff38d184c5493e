//! Host backends of the redirected devices: disk image files and tap interfaces. Only
//! the live World touches them.

pub mod disk;
pub mod tap;
