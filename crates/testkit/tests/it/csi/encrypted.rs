//! The StorageClass parameter `encrypted: "true"`: the controller creates
//! the volume under a new key wrapped by the plugin's cluster key (or
//! refuses, without a key), CreateVolume stays idempotent, the node's
//! keepers stage it with the same key, files written through ext4 are
//! nowhere in plaintext on the nodes, and a copy from a snapshot reads them.

use super::*;
use tonic::Code;
use torus_testkit::Cluster;

fn encrypted(name: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, 256 << 20, mount_cap(Mode::SingleNodeWriter, "ext4"));
    r.parameters.insert("encrypted".into(), "true".into());
    r
}

#[test]
fn encrypted_storage_class_volumes_are_staged_with_the_plugins_key_and_never_stored_in_plaintext() {
    let c = Cluster::start(2, 2);
    let key = c.dir.path().join("cluster.key");
    std::fs::write(&key, torus_testkit::random_bytes(32, 0x5ec7)).unwrap();
    let keyless = c.start_csi("host-a", "controller", &[]);
    let a = c.start_csi("host-b", "all", &["--key-file", &key.display().to_string()]);
    let marker: Vec<u8> = b"CSI-PLAINTEXT-MARKER-".iter().copied().cycle().take(1 << 20).collect();
    runtime().block_on(async {
        let mut without = connect(&keyless.socket).await;
        assert_eq!(code(without.controller.create_volume(encrypted("enc")).await), Code::InvalidArgument);
        let mut csi = connect(&a.socket).await;
        let mut bad = encrypted("enc");
        bad.parameters.insert("encrypted".into(), "yes".into());
        assert_eq!(code(csi.controller.create_volume(bad).await), Code::InvalidArgument);
        let v = ok(csi.controller.create_volume(encrypted("enc")).await, "create").volume.expect("volume");
        assert_eq!(v.volume_context.get("encrypted").map(String::as_str), Some("true"));
        ok(csi.controller.create_volume(encrypted("enc")).await, "the same request again");
        let plain = create_req("enc", 256 << 20, mount_cap(Mode::SingleNodeWriter, "ext4"));
        assert_eq!(code(csi.controller.create_volume(plain).await), Code::AlreadyExists, "not encrypted: a conflict");

        let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
        let staging = a.path("staging-enc");
        std::fs::create_dir_all(&staging).unwrap();
        ok(csi.node.node_stage_volume(stage_req("enc", &staging, cap.clone())).await, "stage");
        std::fs::write(staging.join("secret"), &marker).expect("write a file");
        ok(csi.node.node_unstage_volume(unstage_req("enc", &staging)).await, "unstage");

        let snap = CreateSnapshotRequest { name: "s".into(), source_volume_id: "enc".into(), ..Default::default() };
        ok(csi.controller.create_snapshot(snap).await, "snapshot");
        let mut copy = encrypted("copy");
        copy.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: "enc@s".into(),
            })),
        });
        let v = ok(csi.controller.create_volume(copy).await, "restore").volume.expect("volume");
        assert_eq!(v.volume_context.get("encrypted").map(String::as_str), Some("true"), "a copy keeps the key");
        // From a plain source: refused before anything is made.
        ok(csi.controller.create_volume(create_req("plain", 64 << 20, cap.clone())).await, "a plain volume");
        let mut from_plain = encrypted("from-plain");
        from_plain.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: "plain".into(),
            })),
        });
        assert_eq!(code(csi.controller.create_volume(from_plain).await), Code::InvalidArgument);
        let listed = ok(csi.controller.list_volumes(ListVolumesRequest::default()).await, "list");
        assert!(listed.entries.iter().all(|e| e.volume.as_ref().is_some_and(|v| v.volume_id != "from-plain")));
        let staging = a.path("staging-copy");
        std::fs::create_dir_all(&staging).unwrap();
        ok(csi.node.node_stage_volume(stage_req("copy", &staging, cap)).await, "stage the copy");
        assert!(std::fs::read(staging.join("secret")).expect("the file") == marker, "the copy reads the file");
        ok(csi.node.node_unstage_volume(unstage_req("copy", &staging)).await, "unstage the copy");
    });
    // The nodes hold the file only as ciphertext.
    let needle = &marker[..64];
    for n in &c.nodes {
        for p in crate::files_under(&n.data_dir) {
            let data = std::fs::read(&p).expect("read a node's file");
            assert!(!data.windows(64).any(|w| w == needle), "plaintext in {}", p.display());
        }
    }
}
