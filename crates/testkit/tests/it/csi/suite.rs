//! Our own CSI suite over the unix socket: every RPC of the Identity,
//! Controller and Node services, each called twice (idempotency), and the
//! error codes the specification names for bad input, unknown volumes and
//! nodes, incompatible repeats and conflicts.

use super::*;
use tonic::Code;
use torus_testkit::Cluster;

#[test]
fn identity_and_controller_rpcs_are_idempotent_and_answer_with_the_specified_codes() {
    let c = Cluster::start(2, 2);
    // A short registration lease: a publish to B waits that long (+2 s) for A to lapse before it is refused.
    let a = c.start_csi("host-a", "all", &["--label", "zone=a", "--lease-ttl", "2"]);
    let b = c.start_csi("host-b", "node", &[]);
    runtime().block_on(async {
        let mut csi = connect(&a.socket).await;
        let rwo = mount_cap(Mode::SingleNodeWriter, "ext4");

        // Identity.
        for _ in 0..2 {
            let info = ok(csi.identity.get_plugin_info(GetPluginInfoRequest {}).await, "GetPluginInfo");
            assert_eq!(info.name, "csi.torus.io");
            assert!(!info.vendor_version.is_empty());
            let caps = ok(csi.identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await, "caps");
            let text = format!("{caps:?}");
            assert!(text.contains("ControllerService"), "CONTROLLER_SERVICE advertised: {text}");
            assert!(text.contains("VolumeExpansion { r#type: Online }"), "ONLINE expansion: {text}");
            let probe = ok(csi.identity.probe(ProbeRequest {}).await, "Probe");
            assert_eq!(probe.ready, Some(true));
            let caps =
                ok(csi.controller.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await, "caps");
            assert_eq!(caps.capabilities.len(), 13, "{caps:?}");
        }

        // CreateVolume: bad input.
        let mut bad = create_req("", 1 << 20, rwo.clone());
        assert_eq!(code(csi.controller.create_volume(bad.clone()).await), Code::InvalidArgument, "no name");
        bad.name = "v-bad".into();
        bad.volume_capabilities.clear();
        assert_eq!(code(csi.controller.create_volume(bad.clone()).await), Code::InvalidArgument, "no capability");
        let rwx = mount_cap(Mode::MultiNodeMultiWriter, "ext4");
        assert_eq!(
            code(csi.controller.create_volume(create_req("v-bad", 1 << 20, rwx.clone())).await),
            Code::InvalidArgument
        );
        let mut params = create_req("v-bad", 1 << 20, rwo.clone());
        params.parameters.insert("colour".into(), "red".into());
        assert_eq!(code(csi.controller.create_volume(params).await), Code::InvalidArgument, "unknown parameter");
        let mut range = create_req("v-bad", 2 << 20, rwo.clone());
        range.capacity_range = Some(CapacityRange { required_bytes: 2 << 20, limit_bytes: 1 << 20 });
        assert_eq!(code(csi.controller.create_volume(range).await), Code::OutOfRange, "required > limit");
        let mut name = create_req("bad/name", 1 << 20, rwo.clone());
        name.name = "bad/name".into();
        assert_eq!(code(csi.controller.create_volume(name).await), Code::InvalidArgument, "bad name");
        let list = ok(csi.controller.list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
        assert!(list.entries.is_empty(), "nothing was created by bad requests: {list:?}");

        // CreateVolume: rounded up to the extent size, idempotent, ALREADY_EXISTS for an incompatible repeat.
        let mut first = None;
        for _ in 0..2 {
            let v = ok(csi.controller.create_volume(create_req("vol-a", 5 << 20, rwo.clone())).await, "create");
            let v = v.volume.expect("volume");
            assert_eq!(v.volume_id, "vol-a");
            assert_eq!(v.capacity_bytes, 8 << 20, "5 MiB rounded up to two 4 MiB extents");
            assert_eq!(v.volume_context.get("replication").map(String::as_str), Some("2"));
            if let Some(f) = &first {
                assert_eq!(f, &v, "the repeat answers the same volume");
            }
            first = Some(v);
        }
        assert_eq!(
            code(csi.controller.create_volume(create_req("vol-a", 64 << 30, rwo.clone())).await),
            Code::AlreadyExists
        );
        let mut r1 = create_req("vol-a", 5 << 20, rwo.clone());
        r1.parameters.insert("replication".into(), "1".into());
        assert_eq!(code(csi.controller.create_volume(r1.clone()).await), Code::AlreadyExists, "other replication");
        r1.name = "vol-b".into();
        r1.parameters.insert("csi.storage.k8s.io/fstype".into(), "xfs".into());
        r1.parameters.insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
        let vb = ok(csi.controller.create_volume(r1).await, "create vol-b").volume.expect("volume");
        assert_eq!(vb.volume_context.get("replication").map(String::as_str), Some("1"));
        let mut topo = create_req("vol-c", 0, rwo.clone());
        topo.capacity_range = None;
        let zone_a = Topology { segments: HashMap::from([("topology.csi.torus.io/zone".into(), "a".into())]) };
        topo.accessibility_requirements =
            Some(TopologyRequirement { requisite: vec![zone_a.clone()], preferred: vec![zone_a] });
        let vc = ok(csi.controller.create_volume(topo).await, "create vol-c").volume.expect("volume");
        assert_eq!(vc.capacity_bytes, 1 << 30, "no capacity range: 1 GiB");
        assert!(vc.accessible_topology.is_empty(), "reachable from every host: {vc:?}");

        // ValidateVolumeCapabilities.
        let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
        for _ in 0..2 {
            let r =
                ok(csi.controller.validate_volume_capabilities(validate("vol-a", vec![rwo.clone()])).await, "validate");
            assert!(r.confirmed.is_some(), "{r:?}");
            let r =
                ok(csi.controller.validate_volume_capabilities(validate("vol-a", vec![rwx.clone()])).await, "validate");
            assert!(r.confirmed.is_none() && r.message.contains("MULTI_NODE_MULTI_WRITER"), "{r:?}");
        }
        assert_eq!(
            code(csi.controller.validate_volume_capabilities(validate("", vec![rwo.clone()])).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(csi.controller.validate_volume_capabilities(validate("vol-a", vec![])).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(csi.controller.validate_volume_capabilities(validate("nope", vec![rwo.clone()])).await),
            Code::NotFound
        );

        // ListVolumes, one page at a time.
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = ok(
                csi.controller.list_volumes(ListVolumesRequest { max_entries: 1, starting_token: token.clone() }).await,
                "ListVolumes page",
            );
            assert!(page.entries.len() <= 1);
            for e in &page.entries {
                seen.push(e.volume.as_ref().expect("volume").volume_id.clone());
                let cond = e.status.as_ref().and_then(|s| s.volume_condition.as_ref()).expect("condition");
                assert!(!cond.abnormal, "{cond:?}");
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert_eq!(seen, ["vol-a", "vol-b", "vol-c"]);
        let bad_token = ListVolumesRequest { max_entries: 0, starting_token: "invalid-token".into() };
        assert_eq!(code(csi.controller.list_volumes(bad_token).await), Code::Aborted);
        let negative = ListVolumesRequest { max_entries: -1, starting_token: String::new() };
        assert_eq!(code(csi.controller.list_volumes(negative).await), Code::InvalidArgument);

        // GetCapacity: two 1 GiB nodes, replication 2.
        for _ in 0..2 {
            let cap = ok(csi.controller.get_capacity(GetCapacityRequest::default()).await, "GetCapacity");
            assert!(cap.available_capacity > 0 && cap.available_capacity <= 1 << 30, "{cap:?}");
        }

        // ControllerPublishVolume / Unpublish: which host may attach.
        let publish = |vol: &str, node: &str, ro: bool| controller_publish_req(vol, node, &rwo, ro);
        assert_eq!(
            code(csi.controller.controller_publish_volume(publish("", "host-a", false)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(csi.controller.controller_publish_volume(publish("vol-a", "", false)).await),
            Code::InvalidArgument
        );
        let mut nocap = publish("vol-a", "host-a", false);
        nocap.volume_capability = None;
        assert_eq!(code(csi.controller.controller_publish_volume(nocap).await), Code::InvalidArgument);
        assert_eq!(
            code(csi.controller.controller_publish_volume(publish("nope", "host-a", false)).await),
            Code::NotFound
        );
        assert_eq!(
            code(csi.controller.controller_publish_volume(publish("vol-a", "fake-node-id", false)).await),
            Code::NotFound
        );
        for _ in 0..2 {
            ok(csi.controller.controller_publish_volume(publish("vol-a", "host-a", false)).await, "publish to A");
        }
        assert_eq!(
            code(csi.controller.controller_publish_volume(publish("vol-a", "host-a", true)).await),
            Code::AlreadyExists,
            "same host, other mode"
        );
        let refused = csi.controller.controller_publish_volume(publish("vol-a", &b.node_id, false)).await;
        let msg = refused.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
        assert_eq!(
            code(refused),
            Code::FailedPrecondition,
            "a single-node volume published to a live host is refused to another"
        );
        assert!(msg.contains("host-a"), "the refusal names the host that has it: {msg}");
        let get = |id: &str| ControllerGetVolumeRequest { volume_id: id.into() };
        let got = ok(csi.controller.controller_get_volume(get("vol-a")).await, "ControllerGetVolume");
        assert_eq!(got.status.as_ref().expect("status").published_node_ids, ["host-a"]);
        let unpublish = |vol: &str, node: &str| ControllerUnpublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.into(),
            ..Default::default()
        };
        for _ in 0..2 {
            ok(csi.controller.controller_unpublish_volume(unpublish("vol-a", "host-a")).await, "unpublish");
        }
        ok(csi.controller.controller_unpublish_volume(unpublish("nope", "host-a")).await, "unpublish unknown volume");
        assert_eq!(
            code(csi.controller.controller_unpublish_volume(unpublish("", "host-a")).await),
            Code::InvalidArgument
        );
        ok(csi.controller.controller_publish_volume(publish("vol-a", &b.node_id, false)).await, "now B may have it");

        // ControllerExpandVolume.
        let expand = |id: &str, req: i64, limit: i64| ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(CapacityRange { required_bytes: req, limit_bytes: limit }),
            ..Default::default()
        };
        for _ in 0..2 {
            let r = ok(csi.controller.controller_expand_volume(expand("vol-a", 16 << 20, 0)).await, "expand");
            assert_eq!(r.capacity_bytes, 16 << 20);
            assert!(r.node_expansion_required);
        }
        let r = ok(csi.controller.controller_expand_volume(expand("vol-a", 4 << 20, 0)).await, "smaller: no shrink");
        assert_eq!(r.capacity_bytes, 16 << 20);
        assert_eq!(
            code(csi.controller.controller_expand_volume(expand("vol-a", 4 << 20, 8 << 20)).await),
            Code::OutOfRange
        );
        assert_eq!(code(csi.controller.controller_expand_volume(expand("nope", 16 << 20, 0)).await), Code::NotFound);
        assert_eq!(code(csi.controller.controller_expand_volume(expand("", 16 << 20, 0)).await), Code::InvalidArgument);
        let mut norange = expand("vol-a", 0, 0);
        norange.capacity_range = None;
        assert_eq!(code(csi.controller.controller_expand_volume(norange).await), Code::InvalidArgument);

        // ControllerGetVolume: unknown, healthy, then a storage node down makes it abnormal.
        assert_eq!(code(csi.controller.controller_get_volume(get("nope")).await), Code::NotFound);
        assert_eq!(code(csi.controller.controller_get_volume(get("")).await), Code::InvalidArgument);
        for _ in 0..2 {
            let got = ok(csi.controller.controller_get_volume(get("vol-a")).await, "ControllerGetVolume");
            assert_eq!(got.volume.as_ref().expect("volume").capacity_bytes, 16 << 20);
            let cond = got.status.and_then(|s| s.volume_condition).expect("condition");
            assert!(!cond.abnormal, "{cond:?}");
        }

        // DeleteVolume: idempotent; an unknown volume is already deleted.
        assert_eq!(
            code(
                csi.controller.delete_volume(DeleteVolumeRequest { volume_id: "".into(), ..Default::default() }).await
            ),
            Code::InvalidArgument
        );
        for id in ["vol-b", "vol-b", "nope"] {
            ok(
                csi.controller.delete_volume(DeleteVolumeRequest { volume_id: id.into(), ..Default::default() }).await,
                "delete",
            );
        }
        let list = ok(csi.controller.list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
        let names: Vec<String> = list.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()).collect();
        assert_eq!(names, ["vol-a", "vol-c"]);
    });
    drop((a, b));
}

#[test]
fn a_storage_node_down_makes_the_volume_condition_abnormal() {
    let mut c = Cluster::start(2, 2);
    let a = c.start_csi("host-a", "controller", &[]);
    runtime().block_on(async {
        let mut csi = connect(&a.socket).await;
        let rwo = mount_cap(Mode::SingleNodeWriter, "ext4");
        ok(csi.controller.create_volume(create_req("v", 8 << 20, rwo)).await, "create");
        // Node identity answers without the Node service; the Node service is not served here.
        assert_eq!(code(csi.node.node_get_info(NodeGetInfoRequest {}).await), Code::Unimplemented);
        c.node(1).kill9();
        let get = ControllerGetVolumeRequest { volume_id: "v".into() };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let got = ok(csi.controller.controller_get_volume(get.clone()).await, "ControllerGetVolume");
            let cond = got.status.and_then(|s| s.volume_condition).expect("condition");
            if cond.abnormal {
                assert!(cond.message.contains("down"), "{cond:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the condition never turned abnormal");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn node_rpcs_are_idempotent_and_answer_with_the_specified_codes() {
    let c = Cluster::start(2, 2);
    let a = c.start_csi("host-a", "all", &["--label", "zone=a"]);
    let b = c.start_csi("host-b", "node", &["--lock-wait", "1"]);
    runtime().block_on(async {
        let mut csi = connect(&a.socket).await;
        let mut csb = connect(&b.socket).await;
        // xfs: online growth of ext4 needs CAP_SYS_RESOURCE, which this machine withholds even from root.
        let rwo = mount_cap(Mode::SingleNodeWriter, "xfs");
        ok(csi.controller.create_volume(create_req("v", 512 << 20, rwo.clone())).await, "create");

        for _ in 0..2 {
            let info = ok(csi.node.node_get_info(NodeGetInfoRequest {}).await, "NodeGetInfo");
            assert_eq!(info.node_id, "host-a");
            let topo = info.accessible_topology.expect("topology");
            assert_eq!(topo.segments.get("topology.csi.torus.io/zone").map(String::as_str), Some("a"));
            let caps = ok(csi.node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await, "caps");
            assert_eq!(caps.capabilities.len(), 5, "{caps:?}");
        }

        let staging = a.path("staging");
        let target = a.path("pods/target");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();

        // NodeStageVolume: bad input first, then twice for real.
        assert_eq!(code(csi.node.node_stage_volume(stage_req("", &staging, rwo.clone())).await), Code::InvalidArgument);
        let mut nopath = stage_req("v", &staging, rwo.clone());
        nopath.staging_target_path.clear();
        assert_eq!(code(csi.node.node_stage_volume(nopath).await), Code::InvalidArgument);
        let mut nocap = stage_req("v", &staging, rwo.clone());
        nocap.volume_capability = None;
        assert_eq!(code(csi.node.node_stage_volume(nocap).await), Code::InvalidArgument);
        let rwx = mount_cap(Mode::MultiNodeMultiWriter, "ext4");
        assert_eq!(code(csi.node.node_stage_volume(stage_req("v", &staging, rwx)).await), Code::InvalidArgument);
        assert_eq!(code(csi.node.node_stage_volume(stage_req("nope", &staging, rwo.clone())).await), Code::NotFound);
        for _ in 0..2 {
            ok(csi.node.node_stage_volume(stage_req("v", &staging, rwo.clone())).await, "stage");
        }
        let ext4 = mount_cap(Mode::SingleNodeWriter, "ext4");
        assert_eq!(code(csi.node.node_stage_volume(stage_req("v", &staging, ext4)).await), Code::AlreadyExists);
        assert_eq!(
            code(csi.node.node_stage_volume(stage_req("v", &a.path("elsewhere"), rwo.clone())).await),
            Code::AlreadyExists
        );
        // The writer lock makes a second host wait, then refuses (FAILED_PRECONDITION).
        let b_staging = b.path("staging");
        std::fs::create_dir_all(&b_staging).unwrap();
        assert_eq!(
            code(csb.node.node_stage_volume(stage_req("v", &b_staging, rwo.clone())).await),
            Code::FailedPrecondition
        );
        // In use: the volume cannot be deleted.
        assert_eq!(
            code(
                csi.controller.delete_volume(DeleteVolumeRequest { volume_id: "v".into(), ..Default::default() }).await
            ),
            Code::FailedPrecondition
        );

        // NodePublishVolume.
        assert_eq!(
            code(csi.node.node_publish_volume(publish_req("", &staging, &target, rwo.clone(), false)).await),
            Code::InvalidArgument
        );
        let mut notarget = publish_req("v", &staging, &target, rwo.clone(), false);
        notarget.target_path.clear();
        assert_eq!(code(csi.node.node_publish_volume(notarget).await), Code::InvalidArgument);
        let mut nocap = publish_req("v", &staging, &target, rwo.clone(), false);
        nocap.volume_capability = None;
        assert_eq!(code(csi.node.node_publish_volume(nocap).await), Code::InvalidArgument);
        let mut nostaging = publish_req("v", &staging, &target, rwo.clone(), false);
        nostaging.staging_target_path.clear();
        assert_eq!(code(csi.node.node_publish_volume(nostaging).await), Code::FailedPrecondition);
        assert_eq!(
            code(csi.node.node_publish_volume(publish_req("nope", &staging, &target, rwo.clone(), false)).await),
            Code::NotFound
        );
        for _ in 0..2 {
            ok(csi.node.node_publish_volume(publish_req("v", &staging, &target, rwo.clone(), false)).await, "publish");
        }
        std::fs::write(target.join("hello"), b"torus").expect("write through the published mount");
        let ro_target = a.path("pods/readonly");
        ok(csi.node.node_publish_volume(publish_req("v", &staging, &ro_target, rwo.clone(), true)).await, "publish ro");
        assert_eq!(std::fs::read(ro_target.join("hello")).unwrap(), b"torus");
        let e = std::fs::write(ro_target.join("nope"), b"x").expect_err("a read-only publish refuses writes");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        assert_eq!(
            code(csi.node.node_publish_volume(publish_req("v", &staging, &ro_target, rwo.clone(), false)).await),
            Code::AlreadyExists,
            "published read-only already"
        );
        // ReadWriteOncePod: one publish only; another target is refused before anything is created there.
        let rwop = mount_cap(Mode::SingleNodeSingleWriter, "xfs");
        let other = a.path("pods/other");
        assert_eq!(
            code(csi.node.node_publish_volume(publish_req("v", &staging, &other, rwop.clone(), false)).await),
            Code::FailedPrecondition,
            "a single-writer volume published elsewhere"
        );
        assert!(!other.exists(), "the refused publish left {} behind", other.display());

        // NodeGetVolumeStats.
        let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        };
        let t = target.display().to_string();
        assert_eq!(code(csi.node.node_get_volume_stats(stats("", &t)).await), Code::InvalidArgument);
        assert_eq!(code(csi.node.node_get_volume_stats(stats("v", "")).await), Code::InvalidArgument);
        assert_eq!(code(csi.node.node_get_volume_stats(stats("v", "some/path")).await), Code::NotFound);
        assert_eq!(code(csi.node.node_get_volume_stats(stats("nope", &t)).await), Code::NotFound);
        for _ in 0..2 {
            let s = ok(csi.node.node_get_volume_stats(stats("v", &t)).await, "stats");
            assert_eq!(s.usage.len(), 2, "bytes and inodes: {s:?}");
            assert!(s.usage[0].total > 400 << 20 && s.usage[0].used > 0, "{s:?}");
            assert!(!s.volume_condition.expect("condition").abnormal);
        }

        // NodeExpandVolume after ControllerExpandVolume: the file system grows online.
        let expand = ControllerExpandVolumeRequest {
            volume_id: "v".into(),
            capacity_range: Some(CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
            ..Default::default()
        };
        ok(csi.controller.controller_expand_volume(expand).await, "controller expand");
        let node_expand = |id: &str, path: &str| NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            capacity_range: Some(CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(rwo.clone()),
            ..Default::default()
        };
        assert_eq!(code(csi.node.node_expand_volume(node_expand("", &t)).await), Code::InvalidArgument);
        assert_eq!(code(csi.node.node_expand_volume(node_expand("v", "")).await), Code::InvalidArgument);
        assert_eq!(code(csi.node.node_expand_volume(node_expand("v", "/nonexistent/path")).await), Code::NotFound);
        for _ in 0..2 {
            let r = ok(csi.node.node_expand_volume(node_expand("v", &t)).await, "node expand");
            assert_eq!(r.capacity_bytes, 1 << 30);
        }
        let s = ok(csi.node.node_get_volume_stats(stats("v", &t)).await, "stats");
        assert!(s.usage[0].total > 900 << 20, "the file system grew: {s:?}");

        // Unpublish, unstage: idempotent, nothing left mounted or attached.
        assert_eq!(code(csi.node.node_unpublish_volume(unpublish_req("", &target)).await), Code::InvalidArgument);
        for _ in 0..2 {
            ok(csi.node.node_unpublish_volume(unpublish_req("v", &target)).await, "unpublish");
            ok(csi.node.node_unpublish_volume(unpublish_req("v", &ro_target)).await, "unpublish ro");
        }
        assert!(!target.exists() && !ro_target.exists(), "target paths are removed");
        assert_eq!(code(csi.node.node_unstage_volume(unstage_req("", &staging)).await), Code::InvalidArgument);
        for _ in 0..2 {
            ok(csi.node.node_unstage_volume(unstage_req("v", &staging)).await, "unstage");
        }
        ok(csi.node.node_unstage_volume(unstage_req("never-staged", &staging)).await, "unstage of nothing");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&a.dir.display().to_string()), "nothing is left mounted:\n{mounts}");
        assert!(!a.state_dir.join("attach/v").exists(), "nothing is left attached");

        // A raw block volume: staged and published as a device file.
        let blk = block_cap(Mode::SingleNodeWriter);
        ok(csi.controller.create_volume(create_req("raw", 8 << 20, blk.clone())).await, "create raw");
        let dev_target = a.path("pods/raw-device");
        for _ in 0..2 {
            ok(csi.node.node_stage_volume(stage_req("raw", &staging, blk.clone())).await, "stage raw");
            ok(
                csi.node.node_publish_volume(publish_req("raw", &staging, &dev_target, blk.clone(), false)).await,
                "publish raw",
            );
        }
        let raw = a.path("raw.bin");
        std::fs::write(&raw, torus_testkit::random_bytes(1 << 20, 7)).unwrap();
        crate::ok(
            std::process::Command::new("dd")
                .arg(format!("if={}", raw.display()))
                .arg(format!("of={}", dev_target.display()))
                .args(["bs=1M", "oflag=direct", "status=none"]),
        );
        let back = crate::ok(
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("dd if={} bs=1M count=1 iflag=direct status=none | md5sum", dev_target.display())),
        );
        let want = crate::ok(std::process::Command::new("md5sum").arg(&raw));
        assert_eq!(back.split_whitespace().next(), want.split_whitespace().next(), "bytes through the block device");
        let s = ok(csi.node.node_get_volume_stats(stats("raw", &dev_target.display().to_string())).await, "raw stats");
        assert_eq!(s.usage[0].total, 8 << 20);
        for _ in 0..2 {
            ok(csi.node.node_unpublish_volume(unpublish_req("raw", &dev_target)).await, "unpublish raw");
            ok(csi.node.node_unstage_volume(unstage_req("raw", &staging)).await, "unstage raw");
        }
        assert!(!dev_target.exists());

        // Multi-node readers: the same volume staged read-only on two hosts at once.
        let rox = mount_cap(Mode::MultiNodeReaderOnly, "xfs");
        ok(csi.node.node_stage_volume(stage_req("v", &staging, rox.clone())).await, "stage ro on A");
        ok(csb.node.node_stage_volume(stage_req("v", &b_staging, rox.clone())).await, "stage ro on B");
        let b_target = b.path("pods/t");
        ok(
            csb.node.node_publish_volume(publish_req("v", &b_staging, &b_target, rox.clone(), true)).await,
            "publish ro on B",
        );
        assert_eq!(std::fs::read(b_target.join("hello")).unwrap(), b"torus");
        ok(csb.node.node_unpublish_volume(unpublish_req("v", &b_target)).await, "unpublish B");
        ok(csb.node.node_unstage_volume(unstage_req("v", &b_staging)).await, "unstage B");
        ok(csi.node.node_unstage_volume(unstage_req("v", &staging)).await, "unstage A");
        for _ in 0..2 {
            if let Err(e) =
                csi.controller.delete_volume(DeleteVolumeRequest { volume_id: "v".into(), ..Default::default() }).await
            {
                panic!("delete: {e:?}\n{}", report(&[&a, &b]));
            }
        }
    });
    drop((a, b));
}

/// Writes an MBR partition table (one Linux partition) at the start of `dev`.
fn write_mbr(dev: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut sector = [0u8; 512];
    sector[446 + 4] = 0x83; // Linux
    sector[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    sector[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xaa;
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).expect("open the device");
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&sector).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn node_refusals_read_only_publishes_and_a_keeper_that_dies() {
    let c = Cluster::start(2, 2);
    let a = c.start_csi("host-a", "all", &[]);
    runtime().block_on(async {
        let mut csi = connect(&a.socket).await;
        let staging = a.path("staging");
        std::fs::create_dir_all(&staging).unwrap();
        let blk = block_cap(Mode::SingleNodeWriter);
        let ext4 = mount_cap(Mode::SingleNodeWriter, "ext4");
        let delete = |id: &str| DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };

        // A read-only publish of a block volume staged for writing refuses writes.
        ok(csi.controller.create_volume(create_req("raw", 8 << 20, blk.clone())).await, "create raw");
        ok(csi.node.node_stage_volume(stage_req("raw", &staging, blk.clone())).await, "stage raw");
        let ro_target = a.path("pods/raw-ro");
        for _ in 0..2 {
            ok(
                csi.node.node_publish_volume(publish_req("raw", &staging, &ro_target, blk.clone(), true)).await,
                "publish raw ro",
            );
        }
        // (Recent kernels let a read-only block device be opened for writing and refuse the writes.)
        let refused = std::fs::OpenOptions::new().write(true).open(&ro_target).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &[0xee; 4096])?;
            f.sync_all()
        });
        let e = refused.expect_err("the read-only device refuses writes");
        assert!(matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)), "{e}");
        std::fs::File::open(&ro_target).expect("but can be read");
        let ro_dev = crate::ok(
            std::process::Command::new("losetup")
                .args(["-j", &staged_device(&a.state_dir, "raw").display().to_string()]),
        );
        assert!(!ro_dev.trim().is_empty(), "a read-only loop device over the staged one");
        ok(csi.node.node_unpublish_volume(unpublish_req("raw", &ro_target)).await, "unpublish raw ro");
        let ro_dev = crate::ok(
            std::process::Command::new("losetup")
                .args(["-j", &staged_device(&a.state_dir, "raw").display().to_string()]),
        );
        assert!(ro_dev.trim().is_empty(), "the read-only loop device is gone: {ro_dev}");

        // The device is still open here: unstaging is refused, nothing is detached.
        let dev = staged_device(&a.state_dir, "raw");
        let held = std::fs::File::open(&dev).expect("open the staged device");
        let busy = csi.node.node_unstage_volume(unstage_req("raw", &staging)).await;
        assert_eq!(code(busy), Code::FailedPrecondition);
        assert!(dev.exists() && a.state_dir.join("attach/raw/keeper.json").exists());
        drop(held);

        // A partition table is never formatted over.
        write_mbr(&dev);
        ok(csi.node.node_unstage_volume(unstage_req("raw", &staging)).await, "unstage raw");
        let r = csi.node.node_stage_volume(stage_req("raw", &staging, ext4.clone())).await;
        let msg = r.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
        assert_eq!(code(r), Code::FailedPrecondition);
        assert!(msg.contains("partition table"), "{msg}");
        assert!(!a.log_text().contains("making a file system"), "{}", a.log_text());

        // A blank volume staged read-only: nothing to mount, nothing formatted.
        ok(csi.controller.create_volume(create_req("blank", 64 << 20, ext4.clone())).await, "create blank");
        let ro = mount_cap(Mode::SingleNodeReaderOnly, "ext4");
        assert_eq!(
            code(csi.node.node_stage_volume(stage_req("blank", &staging, ro.clone())).await),
            Code::FailedPrecondition
        );
        // Another file system than asked for: refused, not reformatted.
        ok(csi.node.node_stage_volume(stage_req("blank", &staging, ext4.clone())).await, "stage blank as ext4");
        ok(csi.node.node_unstage_volume(unstage_req("blank", &staging)).await, "unstage");
        let xfs = mount_cap(Mode::SingleNodeWriter, "xfs");
        let r = csi.node.node_stage_volume(stage_req("blank", &staging, xfs)).await;
        let msg = r.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
        assert_eq!(code(r), Code::FailedPrecondition);
        assert!(msg.contains("ext4"), "{msg}");

        // ControllerPublishVolume read-only: the host stages it read-only.
        let publish = controller_publish_req("blank", "host-a", &ext4, true);
        let ctx = ok(csi.controller.controller_publish_volume(publish).await, "publish read-only").publish_context;
        assert_eq!(ctx.get("readonly").map(String::as_str), Some("true"));
        let mut stage = stage_req("blank", &staging, ext4.clone());
        stage.publish_context = ctx;
        ok(csi.node.node_stage_volume(stage).await, "stage with the read-only publish context");
        let target = a.path("pods/blank");
        ok(csi.node.node_publish_volume(publish_req("blank", &staging, &target, ext4.clone(), true)).await, "publish");
        let e = std::fs::write(target.join("x"), b"x").expect_err("read-only");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let keeper: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.state_dir.join("attach/blank/keeper.json")).unwrap()).unwrap();
        assert_eq!(keeper["read_only"], true, "the keeper holds no writer lock");

        // The keeper dies on its own: the condition says so, and unstaging cleans up.
        // SAFETY: kill(2) of the keeper this test's plugin started.
        unsafe { libc::kill(keeper["pid"].as_u64().unwrap() as i32, libc::SIGKILL) };
        let stats = NodeGetVolumeStatsRequest {
            volume_id: "blank".into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let s = ok(csi.node.node_get_volume_stats(stats.clone()).await, "stats");
            if s.volume_condition.as_ref().is_some_and(|c| c.abnormal) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the condition never turned abnormal: {s:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        ok(csi.node.node_unpublish_volume(unpublish_req("blank", &target)).await, "unpublish after the keeper died");
        ok(csi.node.node_unstage_volume(unstage_req("blank", &staging)).await, "unstage after the keeper died");
        let loops = crate::ok(std::process::Command::new("losetup").arg("-a"));
        assert!(!loops.contains(&a.dir.display().to_string()), "loop devices left: {loops}");
        assert!(!a.state_dir.join("attach/blank").exists());
        for id in ["raw", "blank"] {
            ok(csi.controller.delete_volume(delete(id)).await, "delete");
        }
    });
    drop(a);
}
