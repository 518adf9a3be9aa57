//! The keys shared by several parts of the schema (each module keeps the
//! keys only it uses): one place, so that the modules need not use each other.

use torus_types::VolumeId;

/// `volumes/by-name/<name>`: a volume's [`super::VolumeInfo`].
pub(super) fn name_key(name: &str) -> String {
    format!("volumes/by-name/{name}")
}

/// `locks/<volume id>`: its writer's [`super::VolumeLock`], on the writer's lease.
pub(super) fn lock_key(id: VolumeId) -> String {
    format!("locks/{id}")
}

/// `vstate/<volume id>`: its [`super::ReplicaState`].
pub(super) fn state_key(id: VolumeId) -> String {
    format!("vstate/{id}")
}

/// `attachments/<volume name>`: the hosts it is published to.
pub(super) fn attachments_key(volume: &str) -> String {
    format!("attachments/{volume}")
}
