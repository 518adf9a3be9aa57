//! Volume capabilities: which access modes and types Torus serves, checked
//! in one place for CreateVolume, ValidateVolumeCapabilities,
//! ControllerPublishVolume, NodeStageVolume and NodePublishVolume.
//!
//! A Torus volume is a block device with at most one writer. Supported:
//! single-node writer (and its single/multi-writer variants, ReadWriteOncePod
//! among them), single-node reader, multi-node reader. Refused: the
//! multi-node writer modes (a filesystem written from two hosts at once is
//! corrupted, and a raw block device has no arbiter either).

use crate::pb::volume_capability::{access_mode::Mode, AccessType};
use crate::pb::VolumeCapability;
use tonic::Status;

/// File systems NodeStageVolume makes and mounts; the first is the default.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// A mounted file system of this type with these extra mount options.
    Mount { fs_type: String, flags: Vec<String> },
    /// The raw block device.
    Block,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    pub mode: Mode,
    pub access: Access,
}

impl Capability {
    /// The volume is only read through this capability.
    pub fn read_only(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    }

    /// At most one host may have the volume at a time.
    pub fn single_node(&self) -> bool {
        !matches!(self.mode, Mode::MultiNodeReaderOnly)
    }
}

/// Checks one capability; the error says what is wrong (INVALID_ARGUMENT).
pub fn parse(cap: &VolumeCapability) -> Result<Capability, Status> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume capability: access_mode is required"))?
        .mode;
    let mode = Mode::try_from(mode).map_err(|_| Status::invalid_argument(format!("unknown access mode {mode}")))?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::MultiNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => return Err(Status::invalid_argument("volume capability: access mode is UNKNOWN")),
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(Status::invalid_argument(format!(
                "access mode {} is not supported: a Torus volume has one writer at a time (use ReadWriteOnce, \
                 ReadWriteOncePod or ReadOnlyMany)",
                mode.as_str_name()
            )))
        }
    }
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() { FS_TYPES[0].to_string() } else { m.fs_type.clone() };
            if !FS_TYPES.contains(&fs_type.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "file system {:?} is not supported (use one of {})",
                    m.fs_type,
                    FS_TYPES.join(", ")
                )));
            }
            if let Some(bad) = m.mount_flags.iter().find(|f| f.contains(char::is_whitespace) || f.is_empty()) {
                return Err(Status::invalid_argument(format!("mount flag {bad:?} is not a single option")));
            }
            Access::Mount { fs_type, flags: m.mount_flags.clone() }
        }
        None => return Err(Status::invalid_argument("volume capability: access_type (mount or block) is required")),
    };
    Ok(Capability { mode, access })
}

/// Checks a non-empty list of capabilities.
pub fn parse_all(caps: &[VolumeCapability]) -> Result<Vec<Capability>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    caps.iter().map(parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability { access_mode: Some(AccessMode { mode: mode as i32 }), access_type: access }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }))
    }

    #[test]
    fn supported_modes_and_types() {
        let c = parse(&cap(Mode::SingleNodeWriter, mount(""))).expect("rwo");
        assert_eq!(c.access, Access::Mount { fs_type: "ext4".into(), flags: vec![] });
        assert!(!c.read_only() && c.single_node());
        let c = parse(&cap(Mode::MultiNodeReaderOnly, mount("xfs"))).expect("rox");
        assert!(c.read_only() && !c.single_node());
        let c = parse(&cap(Mode::SingleNodeSingleWriter, Some(AccessType::Block(BlockVolume {})))).expect("rwop");
        assert_eq!(c.access, Access::Block);
    }

    #[test]
    fn refused_modes_and_types_are_invalid_arguments() {
        for c in [
            cap(Mode::MultiNodeMultiWriter, mount("ext4")),
            cap(Mode::MultiNodeSingleWriter, mount("ext4")),
            cap(Mode::Unknown, mount("ext4")),
            cap(Mode::SingleNodeWriter, mount("btrfs")),
            cap(Mode::SingleNodeWriter, None),
            VolumeCapability { access_mode: None, access_type: mount("ext4") },
        ] {
            assert_eq!(parse(&c).expect_err("refused").code(), tonic::Code::InvalidArgument, "{c:?}");
        }
        assert_eq!(parse_all(&[]).expect_err("empty").code(), tonic::Code::InvalidArgument);
    }
}
