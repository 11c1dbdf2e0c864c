//! The `AuthService` gRPC API: checks who calls, converts messages and maps errors. The rules live in
//! [`crate::domain`], the work in [`crate::handler`].

use std::sync::Arc;

use nsml_common::bounds;
use nsml_common::caller::Caller;
use nsml_proto::internal::v1::AuthenticateRequest;
use nsml_proto::internal::v1::auth_internal_server::AuthInternal;
use nsml_proto::v1::auth_service_server::AuthService as AuthApi;
use nsml_proto::v1::{
    AddUserRequest, ApplyCompetitionRequest, Competition, Empty, GetCompetitionRequest, Identity,
    ListCompetitionsResponse, LoginRequest, LoginResponse, RevealPrivateRequest,
};
use tonic::{Request, Response, Status};

use crate::error::AuthError;
use crate::handler::Auth;

/// Metadata key under which the gateway names the address a public call came from. Only the gateway and
/// services reach the auth service (they carry the internal secret), and the gateway drops whatever
/// `x-nsml-*` metadata a client sent, so the value is the gateway's word.
pub const PEER_KEY: &str = "x-nsml-peer";

/// The `nsml.v1.AuthService` implementation.
#[derive(Clone)]
pub struct AuthService {
    core: Arc<Auth>,
}

impl AuthService {
    /// Serves the handlers in `core`.
    pub(crate) fn new(core: Arc<Auth>) -> Self {
        Self { core }
    }
}

/// The bearer token a call carries.
fn bearer<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

/// The address a call came from, as the gateway names it; calls from inside the deployment share one name.
fn source_of<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(PEER_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64)
        .unwrap_or("internal")
        .to_string()
}

#[tonic::async_trait]
impl AuthApi for AuthService {
    async fn login(&self, req: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        bounds::check(&req)?;
        let source = source_of(&req);
        let r = req.into_inner();
        let out = self.core.login(&source, r.username, r.password).await?;
        Ok(Response::new(out))
    }

    async fn logout(&self, req: Request<Empty>) -> Result<Response<Empty>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.user()?;
        let token = bearer(&req).ok_or(AuthError::NoToken)?;
        self.core.logout(&token, &caller.actor()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn who_am_i(&self, req: Request<Empty>) -> Result<Response<Identity>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Ok(Response::new(caller.user()?.clone()))
    }

    async fn add_user(&self, req: Request<AddUserRequest>) -> Result<Response<Empty>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        self.core.add_user(&caller, req.into_inner()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn apply_competition(
        &self,
        req: Request<ApplyCompetitionRequest>,
    ) -> Result<Response<Competition>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let out = self
            .core
            .apply_competition(&caller, req.into_inner())
            .await?;
        Ok(Response::new(out))
    }

    async fn list_competitions(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<ListCompetitionsResponse>, Status> {
        bounds::check(&req)?;
        Caller::of(&req)?.require_authenticated()?;
        let competitions = self.core.read(|s| {
            s.competitions
                .keys()
                .filter_map(|id| s.competition_view(id))
                .collect()
        });
        Ok(Response::new(ListCompetitionsResponse { competitions }))
    }

    async fn get_competition(
        &self,
        req: Request<GetCompetitionRequest>,
    ) -> Result<Response<Competition>, Status> {
        bounds::check(&req)?;
        Caller::of(&req)?.require_authenticated()?;
        Ok(Response::new(self.core.competition(&req.get_ref().id)?))
    }

    async fn reveal_private(
        &self,
        req: Request<RevealPrivateRequest>,
    ) -> Result<Response<Competition>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let id = req.into_inner().competition;
        Ok(Response::new(self.core.reveal_private(&caller, &id).await?))
    }
}

#[tonic::async_trait]
impl AuthInternal for AuthService {
    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<Identity>, Status> {
        bounds::check(&req)?;
        Caller::of(&req)?.require_service()?;
        Ok(Response::new(self.core.authenticate(&req.get_ref().token)?))
    }
}
