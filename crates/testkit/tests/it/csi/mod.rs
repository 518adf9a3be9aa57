//! The CSI driver, end to end: our own suite over the unix socket (every
//! RPC, twice, and the error codes the spec names), the kubelet's sequence
//! with two hosts, a host's death, a plugin restart under load, and
//! never formatting a volume that could not be read.

mod encrypted;
mod failover;
mod kubelet;
mod never_format;
mod snapshots;
mod suite;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint, Uri};
use torus_csi::pb::controller_client::ControllerClient;
use torus_csi::pb::identity_client::IdentityClient;
use torus_csi::pb::node_client::NodeClient;
use torus_csi::pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
use torus_csi::pb::*;

/// The three CSI clients on one plugin's socket.
pub struct Csi {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

pub async fn connect(socket: &Path) -> Csi {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        }))
        .await
        .expect("connect to the CSI socket");
    Csi {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    }
}

pub fn mount_cap(mode: Mode, fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: fs_type.into(), ..Default::default() })),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn create_req(name: &str, bytes: i64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn controller_publish_req(
    volume: &str,
    node: &str,
    cap: &VolumeCapability,
    ro: bool,
) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(cap.clone()),
        readonly: ro,
        ..Default::default()
    }
}

pub fn stage_req(volume: &str, path: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: path.display().to_string(),
        volume_capability: Some(cap),
        publish_context: HashMap::new(),
        ..Default::default()
    }
}

pub fn publish_req(
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    ro: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly: ro,
        ..Default::default()
    }
}

pub fn unstage_req(volume: &str, path: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest { volume_id: volume.into(), staging_target_path: path.display().to_string() }
}

pub fn unpublish_req(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest { volume_id: volume.into(), target_path: target.display().to_string() }
}

/// The code of a call that must fail.
pub fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(resp) => panic!("expected an error, got {resp:?}"),
        Err(s) => s.code(),
    }
}

/// Asserts success, with the status message on failure.
pub fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) -> T {
    match r {
        Ok(resp) => resp.into_inner(),
        Err(s) => panic!("{what}: {:?}: {}", s.code(), s.message()),
    }
}

/// The device a staged volume is attached as, from the plugin's records.
pub fn staged_device(state_dir: &Path, volume: &str) -> PathBuf {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("attach").join(volume).join("keeper.json")).unwrap())
            .unwrap();
    PathBuf::from(v["device"].as_str().unwrap())
}

/// The writer's epoch of an attachment, from the plugin's records.
pub fn staged_epoch(state_dir: &Path, volume: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("attach").join(volume).join("keeper.json")).unwrap())
            .unwrap();
    v["epoch"].as_u64().unwrap()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The logs of plugins and their keepers, and the processes left in their cgroups: for failure messages.
pub fn report(plugins: &[&torus_testkit::csi::CsiPlugin]) -> String {
    let mut out = String::new();
    for p in plugins {
        out += &format!("=== {} logs\n{}", p.node_id, p.all_logs());
        for pid in torus_testkit::csi::Cgroup::pids(&p.cgroup.path) {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ");
            out += &format!("=== {} process {pid}: {cmd}\n", p.node_id);
        }
    }
    out
}
