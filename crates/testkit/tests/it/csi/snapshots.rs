//! CSI snapshots and clones: CreateSnapshot, DeleteSnapshot, ListSnapshots
//! (with pagination), CreateVolume from a snapshot and from a volume, each
//! called twice, with the codes the specification names; the data checked
//! over NBD with qemu-io.

use super::*;
use crate::qemu_io;
use tonic::Code;
use torus_testkit::Cluster;

fn snap_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() }
}

fn from(name: &str, bytes: i64, source: volume_content_source::Type) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes, mount_cap(Mode::SingleNodeWriter, "ext4"));
    r.volume_content_source = Some(VolumeContentSource { r#type: Some(source) });
    r
}

fn of_snapshot(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: id.into() })
}

fn of_volume(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: id.into() })
}

#[test]
fn snapshot_and_clone_rpcs_are_idempotent_and_answer_with_the_specified_codes() {
    let c = Cluster::start(2, 2);
    let plugin = c.start_csi("host-a", "controller", &[]);
    let blk = c.start_blk(&[]);
    runtime().block_on(async {
        let mut csi = connect(&plugin.socket).await;
        let rwo = mount_cap(Mode::SingleNodeWriter, "ext4");
        ok(csi.controller.create_volume(create_req("src", 8 << 20, rwo.clone())).await, "create src");
        ok(csi.controller.create_volume(create_req("other", 4 << 20, rwo.clone())).await, "create other");
        qemu_io(&blk.uri("src"), &["write -P 0x61 0 8M", "flush"]);

        // CreateSnapshot: bad input, then twice the same, then the name on another volume.
        let c_ = &mut csi.controller;
        assert_eq!(code(c_.create_snapshot(snap_req("", "src")).await), Code::InvalidArgument, "no name");
        assert_eq!(code(c_.create_snapshot(snap_req("s1", "")).await), Code::InvalidArgument, "no source");
        assert_eq!(code(c_.create_snapshot(snap_req("s1", "nope")).await), Code::NotFound, "unknown source");
        assert_eq!(code(c_.create_snapshot(snap_req("bad/name", "src")).await), Code::InvalidArgument);
        let mut first = None;
        for _ in 0..2 {
            let s = ok(c_.create_snapshot(snap_req("s1", "src")).await, "CreateSnapshot").snapshot.expect("snap");
            assert_eq!((s.snapshot_id.as_str(), s.source_volume_id.as_str()), ("src@s1", "src"));
            assert_eq!(s.size_bytes, 8 << 20);
            assert!(s.ready_to_use && s.creation_time.is_some(), "{s:?}");
            if let Some(f) = &first {
                assert_eq!(f, &s, "the repeat answers the same snapshot");
            }
            first = Some(s);
        }
        assert_eq!(code(c_.create_snapshot(snap_req("s1", "other")).await), Code::AlreadyExists, "name taken");
        qemu_io(&blk.uri("src"), &["write -P 0x62 0 1M", "flush"]);
        for (name, vol) in [("s2", "src"), ("s3", "src"), ("o1", "other")] {
            ok(c_.create_snapshot(snap_req(name, vol)).await, "CreateSnapshot");
        }

        // ListSnapshots: all, by source, by id, paginated, bad token.
        let all = ok(c_.list_snapshots(ListSnapshotsRequest::default()).await, "ListSnapshots");
        let ids: Vec<String> =
            all.entries.iter().filter_map(|e| e.snapshot.as_ref()).map(|s| s.snapshot_id.clone()).collect();
        assert_eq!(ids, ["other@o1", "src@s1", "src@s2", "src@s3"]);
        let by_src = ListSnapshotsRequest { source_volume_id: "src".into(), ..Default::default() };
        assert_eq!(ok(c_.list_snapshots(by_src).await, "by source").entries.len(), 3);
        let by_id = ListSnapshotsRequest { snapshot_id: "src@s2".into(), ..Default::default() };
        assert_eq!(ok(c_.list_snapshots(by_id).await, "by id").entries.len(), 1);
        let none = ListSnapshotsRequest { snapshot_id: "src@zzz".into(), ..Default::default() };
        assert!(ok(c_.list_snapshots(none).await, "unknown id").entries.is_empty());
        let none = ListSnapshotsRequest { source_volume_id: "nope".into(), ..Default::default() };
        assert!(ok(c_.list_snapshots(none).await, "unknown source").entries.is_empty());
        let mut paged = Vec::new();
        let mut token = String::new();
        loop {
            let req = ListSnapshotsRequest { max_entries: 3, starting_token: token, ..Default::default() };
            let page = ok(c_.list_snapshots(req).await, "page");
            assert!(page.entries.len() <= 3);
            paged.extend(page.entries.into_iter().filter_map(|e| e.snapshot).map(|s| s.snapshot_id));
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert_eq!(paged, ids, "pages cover every snapshot once");
        let bad = ListSnapshotsRequest { starting_token: "garbage".into(), ..Default::default() };
        assert_eq!(code(c_.list_snapshots(bad).await), Code::Aborted);
        let negative = ListSnapshotsRequest { max_entries: -1, ..Default::default() };
        assert_eq!(code(c_.list_snapshots(negative).await), Code::InvalidArgument);

        // CreateVolume from a snapshot (twice), too small a limit, unknown sources, and from a volume.
        for _ in 0..2 {
            let v = ok(c_.create_volume(from("restored", 4 << 20, of_snapshot("src@s1"))).await, "from snapshot");
            let v = v.volume.expect("volume");
            assert_eq!(v.capacity_bytes, 8 << 20, "never smaller than the snapshot");
            assert!(v.content_source.is_some(), "{v:?}");
        }
        let mut small = from("small", 4 << 20, of_snapshot("src@s1"));
        small.capacity_range = Some(CapacityRange { required_bytes: 4 << 20, limit_bytes: 4 << 20 });
        assert_eq!(code(c_.create_volume(small).await), Code::OutOfRange, "limit below the snapshot's size");
        assert_eq!(code(c_.create_volume(from("x", 1 << 20, of_snapshot("src@nope"))).await), Code::NotFound);
        assert_eq!(code(c_.create_volume(from("x", 1 << 20, of_snapshot("garbage"))).await), Code::NotFound);
        assert_eq!(code(c_.create_volume(from("x", 1 << 20, of_volume("nope"))).await), Code::NotFound);
        assert_eq!(
            code(c_.create_volume(from("restored", 4 << 20, of_snapshot("src@s2"))).await),
            Code::AlreadyExists,
            "the name exists from another source"
        );
        for _ in 0..2 {
            let v = ok(c_.create_volume(from("copy", 16 << 20, of_volume("src"))).await, "from volume");
            assert_eq!(v.volume.expect("volume").capacity_bytes, 16 << 20, "grown to the request");
        }

        // The data: the restored volume reads the first snapshot, the copy the volume as it was.
        qemu_io(&blk.uri("restored"), &["read -P 0x61 0 8M"]);
        qemu_io(&blk.uri("copy"), &["read -P 0x62 0 1M", "read -P 0x61 1M 7M", "read -P 0 8M 8M"]);

        // DeleteSnapshot: twice; unknown and malformed ids are deleted already; a
        // snapshot with a clone goes too, and the clone still reads its data.
        assert_eq!(code(c_.delete_snapshot(DeleteSnapshotRequest::default()).await), Code::InvalidArgument);
        let del = |id: &str| DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
        for id in ["src@s2", "src@s2", "src@nope", "garbage", "nope@x", "src@s1"] {
            ok(c_.delete_snapshot(del(id)).await, "DeleteSnapshot");
        }
        qemu_io(&blk.uri("restored"), &["read -P 0x61 0 8M"]);
        // A volume with snapshots cannot go; once they are gone it can, and its clones still read.
        let delv = |id: &str| DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
        assert_eq!(code(c_.delete_volume(delv("src")).await), Code::FailedPrecondition, "has snapshots");
        ok(c_.delete_snapshot(del("src@s3")).await, "DeleteSnapshot");
        ok(c_.delete_volume(delv("src")).await, "DeleteVolume once its snapshots are gone");
        qemu_io(&blk.uri("copy"), &["read -P 0x62 0 1M", "read -P 0x61 1M 7M"]);
        for v in ["restored", "copy"] {
            ok(c_.delete_volume(delv(v)).await, "DeleteVolume of a clone");
        }
        let left = ok(c_.list_snapshots(ListSnapshotsRequest::default()).await, "ListSnapshots");
        let left: Vec<String> = left.entries.into_iter().filter_map(|e| e.snapshot).map(|s| s.snapshot_id).collect();
        assert_eq!(left, ["other@o1"], "the snapshot a volume's clone was made from is gone");
    });
}

#[test]
fn a_snapshot_restored_into_a_larger_claim_is_staged_with_its_files_and_a_file_system_that_fills_it() {
    let c = Cluster::start(2, 2);
    let a = c.start_csi("host-a", "all", &[]);
    runtime().block_on(async {
        let mut csi = connect(&a.socket).await;
        // xfs: online growth of ext4 needs CAP_SYS_RESOURCE, which this machine withholds even from root.
        let cap = mount_cap(Mode::SingleNodeWriter, "xfs");
        ok(csi.controller.create_volume(create_req("small", 512 << 20, cap.clone())).await, "create");
        let staging = a.path("staging-small");
        std::fs::create_dir_all(&staging).unwrap();
        ok(csi.node.node_stage_volume(stage_req("small", &staging, cap.clone())).await, "stage");
        std::fs::write(staging.join("kept"), b"from before the snapshot").expect("write a file");
        ok(csi.node.node_unstage_volume(unstage_req("small", &staging)).await, "unstage");
        ok(csi.controller.create_snapshot(snap_req("snap", "small")).await, "CreateSnapshot");
        let big = ok(csi.controller.create_volume(from("big", 1 << 30, of_snapshot("small@snap"))).await, "restore");
        assert_eq!(big.volume.expect("volume").capacity_bytes, 1 << 30);

        let staging = a.path("staging-big");
        std::fs::create_dir_all(&staging).unwrap();
        ok(csi.node.node_stage_volume(stage_req("big", &staging, cap.clone())).await, "stage the restored volume");
        assert_eq!(std::fs::read(staging.join("kept")).expect("the file"), b"from before the snapshot");
        let stats = NodeGetVolumeStatsRequest {
            volume_id: "big".into(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        };
        let s = ok(csi.node.node_get_volume_stats(stats).await, "stats");
        assert!(s.usage[0].total > 900 << 20, "the file system fills the 1 GiB volume: {s:?}");
        ok(csi.node.node_unstage_volume(unstage_req("big", &staging)).await, "unstage");
    });
}
