//! torus-csi: Torus as a CSI v1.10.0 driver (Identity, Controller, Node).
//!
//! - [`pb`]: the messages and services generated from the specification's
//!   `csi.proto` (in `proto/`, unchanged).
//! - [`identity`], [`controller`], [`node`]: the three services.
//! - [`caps`]: which access modes and types are served; [`status`]: our
//!   errors as gRPC codes, in one place; [`mount`]: mounts, probing,
//!   formatting and growing file systems on the host.
//! - [`server`]: the unix socket, and the host's registration in etcd;
//!   [`metrics`]: every call counted by method and gRPC code, and timed.
//! - `snapshots`: CreateSnapshot, DeleteSnapshot, ListSnapshots, volumes
//!   from a snapshot or a volume.
//!
//! Depends on torus-meta for volumes, on torus-attach's `Attacher` trait
//! for local devices, and on torus-volume's manager only to take a snapshot
//! of a volume nobody has open (a writer between two writes): it knows
//! nothing of NBD or FUSE.

pub mod caps;
pub mod controller;
pub mod identity;
pub mod metrics;
pub mod mount;
pub mod node;
pub mod server;
mod snapshots;
pub mod status;

/// The messages and services of the CSI specification.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

/// The driver's name, as Kubernetes' CSIDriver object and StorageClasses name it.
pub const DRIVER_NAME: &str = "csi.torus.io";
/// Topology segments are the host's failure-domain labels under this prefix
/// (`--label zone=a` -> `topology.csi.torus.io/zone: a`).
pub const TOPOLOGY_PREFIX: &str = "topology.csi.torus.io/";

/// The `publish_context` key ControllerPublishVolume sets for a read-only publish.
pub const PUBLISH_READONLY: &str = "readonly";

pub use server::{serve, Mode, Options, ServeError};

/// A required string field, or INVALID_ARGUMENT naming it.
pub(crate) fn need(field: &str, value: &str) -> Result<(), tonic::Status> {
    if value.is_empty() {
        return Err(tonic::Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}
