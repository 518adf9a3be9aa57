//! torus-attach: a volume as a local block device on this host.
//!
//! - [`keeper`]: the process that holds one attachment: it opens the volume
//!   (the writer lock and its epoch for a writable one), serves it through
//!   [`fuse`] (one file, `disk`) bound to a loop device ([`loopdev`]), or
//!   through the kernel NBD driver ([`nbd_kernel`]), and detaches on request.
//!   It outlives the node plugin that started it.
//! - [`record`]: what a keeper leaves on disk so a restarted plugin finds it.
//! - [`attacher`]: the [`Attacher`] trait the CSI node service calls, and
//!   [`ProcessAttacher`], which starts, finds and stops keepers.
//!
//! Depends on torus-volume, torus-meta and torus-nbd (the transmission phase
//! the kernel NBD driver speaks); knows nothing of CSI.

pub mod attacher;
mod error;
pub mod fuse;
pub mod keeper;
pub mod loopdev;
pub mod nbd_kernel;
pub mod record;

pub use attacher::{AttachRequest, Attacher, Attachment, ProcessAttacher};
pub use error::AttachError;
