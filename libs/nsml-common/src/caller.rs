//! Who is calling a service, as the gateway or a sibling service vouches for it.
//!
//! Services accept calls only when they carry the deployment's internal secret (`x-nsml-internal`); the
//! gateway is the only public surface. The gateway resolves the bearer token to an [`Identity`] and passes
//! it on as `x-nsml-identity-bin`; a sibling service names itself in `x-nsml-service`.

use crate::error::ErrorCode;
use nsml_proto::v1::Identity;
use prost::Message;
use tonic::metadata::{Binary, MetadataMap, MetadataValue};
use tonic::{Request, Status};

/// Metadata key carrying the deployment's internal secret.
pub const INTERNAL_SECRET_KEY: &str = "x-nsml-internal";
/// Metadata key carrying the authenticated user's identity (protobuf, binary metadata).
pub const IDENTITY_KEY: &str = "x-nsml-identity-bin";
/// Metadata key naming the calling service.
pub const SERVICE_KEY: &str = "x-nsml-service";

/// The party a request acts for.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No credentials: only public calls such as `Login` are allowed.
    Anonymous,
    /// A signed-in user, as resolved by the auth service.
    User(Identity),
    /// Another service or the runner, inside the deployment.
    Service(String),
}

impl Caller {
    /// Reads the caller from request metadata. The internal secret has already been checked by
    /// [`crate::server::InternalGuard`].
    pub fn from_metadata(md: &MetadataMap) -> Result<Self, Status> {
        if let Some(v) = md.get_bin(IDENTITY_KEY) {
            let bytes = v
                .to_bytes()
                .map_err(|_| ErrorCode::BadRequest.status("malformed identity metadata"))?;
            let id = Identity::decode(bytes.as_ref())
                .map_err(|_| ErrorCode::BadRequest.status("malformed identity metadata"))?;
            return Ok(Caller::User(id));
        }
        if let Some(v) = md.get(SERVICE_KEY) {
            let name = v
                .to_str()
                .map_err(|_| ErrorCode::BadRequest.status("malformed service metadata"))?;
            return Ok(Caller::Service(name.to_string()));
        }
        Ok(Caller::Anonymous)
    }

    /// Reads the caller of a request.
    pub fn of<T>(req: &Request<T>) -> Result<Self, Status> {
        Self::from_metadata(req.metadata())
    }

    /// Writes an identity into outgoing metadata.
    pub fn attach_identity(md: &mut MetadataMap, id: &Identity) {
        md.insert_bin(IDENTITY_KEY, Self::identity_metadata(id));
    }

    /// An identity as outgoing metadata carries it, under [`IDENTITY_KEY`].
    pub fn identity_metadata(id: &Identity) -> MetadataValue<Binary> {
        MetadataValue::from_bytes(&id.encode_to_vec())
    }

    /// The user's name, or the service's.
    pub fn name(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".into(),
            Caller::User(id) => id.username.clone(),
            Caller::Service(s) => format!("service:{s}"),
        }
    }

    /// The actor recorded in event metadata.
    pub fn actor(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".into(),
            Caller::User(id) => format!("user:{}", id.username),
            Caller::Service(s) => format!("service:{s}"),
        }
    }

    /// Requires a signed-in user or a service.
    pub fn require_authenticated(&self) -> Result<(), Status> {
        match self {
            Caller::Anonymous => Err(ErrorCode::Unauthenticated
                .status("not logged in: run `nsml login` (or set NSML_TOKEN)")),
            _ => Ok(()),
        }
    }

    /// Requires a signed-in user; returns their identity.
    pub fn user(&self) -> Result<&Identity, Status> {
        match self {
            Caller::User(id) => Ok(id),
            Caller::Anonymous => Err(ErrorCode::Unauthenticated
                .status("not logged in: run `nsml login` (or set NSML_TOKEN)")),
            Caller::Service(_) => Err(ErrorCode::PermissionDenied.status("this call needs a user")),
        }
    }

    /// Whether the call comes from inside the deployment (a service or the runner).
    pub fn is_service(&self) -> bool {
        matches!(self, Caller::Service(_))
    }

    /// Requires a call from inside the deployment.
    pub fn require_service(&self) -> Result<(), Status> {
        if self.is_service() {
            Ok(())
        } else {
            Err(ErrorCode::PermissionDenied.status("internal call"))
        }
    }

    /// Whether the caller is a platform administrator.
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::User(id) if id.admin)
    }

    /// Whether the caller may act as host of `competition` (services are trusted).
    pub fn is_host_of(&self, competition: &str) -> bool {
        match self {
            Caller::User(id) => id.admin || id.hosts.iter().any(|h| h == competition),
            Caller::Service(_) => true,
            Caller::Anonymous => false,
        }
    }

    /// Whether the caller hosts any competition.
    pub fn is_any_host(&self) -> bool {
        match self {
            Caller::User(id) => id.admin || !id.hosts.is_empty(),
            Caller::Service(_) => true,
            Caller::Anonymous => false,
        }
    }

    /// Requires host rights on `competition`.
    pub fn require_host_of(&self, competition: &str) -> Result<(), Status> {
        self.require_authenticated()?;
        if self.is_host_of(competition) {
            Ok(())
        } else {
            Err(ErrorCode::PermissionDenied.status(format!(
                "only hosts of competition `{competition}` may do this"
            )))
        }
    }

    /// The caller's team in `competition`, if any.
    pub fn team_in(&self, competition: &str) -> Option<&str> {
        match self {
            Caller::User(id) => id
                .memberships
                .iter()
                .find(|m| m.competition == competition)
                .map(|m| m.team.as_str()),
            _ => None,
        }
    }

    /// Whether the caller may see what belongs to `team` in `competition`: its members, its hosts, services.
    pub fn may_access_team(&self, team: &str, competition: &str) -> bool {
        match self {
            Caller::Service(_) => true,
            Caller::User(id) => {
                id.admin
                    || id.hosts.iter().any(|h| h == competition)
                    || id
                        .memberships
                        .iter()
                        .any(|m| m.team == team && m.competition == competition)
            }
            Caller::Anonymous => false,
        }
    }

    /// Whether the caller is a member of `team` in any competition.
    pub fn is_member_of(&self, team: &str) -> bool {
        matches!(self, Caller::User(id) if id.memberships.iter().any(|m| m.team == team))
    }
}
