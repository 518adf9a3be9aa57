//! The CSI Identity service: name, version, capabilities, readiness.

use crate::pb::identity_server::Identity;
use crate::pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use crate::pb::*;
use crate::DRIVER_NAME;
use std::collections::HashMap;
use tonic::{Request, Response, Status};
use torus_meta::cluster::Cluster;

pub struct IdentityService {
    pub(crate) cluster: Cluster,
    /// Whether this process serves the Controller service.
    pub(crate) controller: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let svc = |t: service::Type| PluginCapability { r#type: Some(Type::Service(Service { r#type: t as i32 })) };
        let mut capabilities = vec![svc(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(svc(service::Type::ControllerService));
        }
        capabilities.push(PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    /// Ready once the cluster's metadata answers.
    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        match self.cluster.config().await {
            Ok(_) => Ok(Response::new(ProbeResponse { ready: Some(true) })),
            Err(e) => Err(Status::failed_precondition(format!("not ready: {e}"))),
        }
    }
}
