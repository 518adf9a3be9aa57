//! Never format on error: a volume whose first read fails (its only replica
//! of the first extent is down) is not formatted; NodeStageVolume fails, and
//! once the node is back the volume holds the same file system and files.

use super::kubelet::{check_files, write_files};
use super::*;
use crate::ok as run_ok;
use std::process::Command;
use torus_testkit::Cluster;

fn fs_uuid(dev: &Path) -> String {
    run_ok(Command::new("blkid").args(["-p", "-s", "UUID", "-o", "value"]).arg(dev)).trim().to_string()
}

#[test]
fn a_volume_whose_first_read_fails_is_not_formatted_and_the_stage_fails() {
    let mut c = Cluster::start(2, 1);
    let a = c.start_csi("host-a", "all", &[]);
    let b = c.start_csi("host-b", "node", &[]);
    runtime().block_on(async {
        let mut ca = connect(&a.socket).await;
        let mut cb = connect(&b.socket).await;
        let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
        let mut req = create_req("pvc-r1", 64 << 20, cap.clone());
        req.parameters.insert("replication".into(), "1".into());
        ok(ca.controller.create_volume(req).await, "create with replication 1");

        // A formats the blank volume and writes files; the raw UUID is noted.
        let (staging, target) = (a.path("globalmount"), a.path("pods/p/volumes/data"));
        std::fs::create_dir_all(&staging).unwrap();
        ok(ca.node.node_stage_volume(stage_req("pvc-r1", &staging, cap.clone())).await, "NodeStage A");
        let uuid = fs_uuid(&staged_device(&a.state_dir, "pvc-r1"));
        ok(
            ca.node.node_publish_volume(publish_req("pvc-r1", &staging, &target, cap.clone(), false)).await,
            "NodePublish A",
        );
        let files = write_files(&target, 4, 11);
        ok(ca.node.node_unpublish_volume(unpublish_req("pvc-r1", &target)).await, "NodeUnpublish A");
        ok(ca.node.node_unstage_volume(unstage_req("pvc-r1", &staging)).await, "NodeUnstage A");

        // The only node holding the first extent goes down.
        let vol: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["volume", "list", "-o", "json"])).unwrap();
        let first = format!("{}/0", vol[0]["id"].as_u64().unwrap());
        let holder =
            (0..c.nodes.len()).find(|&i| c.extents_on_disk(i).contains(&first)).expect("a node holds extent 0");
        c.node(holder).kill9();

        // Staging on B fails with an error, and nothing was formatted.
        let b_staging = b.path("globalmount");
        std::fs::create_dir_all(&b_staging).unwrap();
        let err = cb.node.node_stage_volume(stage_req("pvc-r1", &b_staging, cap.clone())).await.expect_err("must fail");
        eprintln!("NodeStageVolume with the first extent unreadable: {:?}: {}", err.code(), err.message());
        assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
        assert!(err.message().contains("not formatting"), "{}", err.message());
        assert!(!b.log_text().contains("making a file system"), "{}", b.log_text());
        assert!(!b.state_dir.join("staged/pvc-r1.json").exists(), "nothing recorded as staged");
        assert!(!b.state_dir.join("attach/pvc-r1/keeper.json").exists(), "nothing left attached");

        // Back: the same file system with the same files.
        c.start_node(holder);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match cb.node.node_stage_volume(stage_req("pvc-r1", &b_staging, cap.clone())).await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("retrying the stage: {}", e.message());
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => panic!("staging after the node returned: {e:?}"),
            }
        }
        assert_eq!(fs_uuid(&staged_device(&b.state_dir, "pvc-r1")), uuid, "the same file system, not a new one");
        let b_target = b.path("pods/p/volumes/data");
        ok(
            cb.node.node_publish_volume(publish_req("pvc-r1", &b_staging, &b_target, cap.clone(), false)).await,
            "NodePublish B",
        );
        check_files(&b_target, &files);
        ok(cb.node.node_unpublish_volume(unpublish_req("pvc-r1", &b_target)).await, "NodeUnpublish B");
        ok(cb.node.node_unstage_volume(unstage_req("pvc-r1", &b_staging)).await, "NodeUnstage B");
    });
    drop((a, b));
}
