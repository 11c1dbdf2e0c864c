//! Clients of the other services, reached by address from configuration in both deployments.

use nsml_proto::v1::{
    auth_service_client::AuthServiceClient, leaderboard_service_client::LeaderboardServiceClient,
    quota_service_client::QuotaServiceClient, session_service_client::SessionServiceClient,
    storage_service_client::StorageServiceClient,
    submission_service_client::SubmissionServiceClient,
};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::caller::{INTERNAL_SECRET_KEY, SERVICE_KEY};
use crate::telemetry;

/// Largest gRPC message the platform sends or accepts (predictions of a big test set).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Where each service listens (`http://host:port`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAddrs {
    pub auth: String,
    pub storage: String,
    pub session: String,
    pub quota: String,
    pub submission: String,
    pub leaderboard: String,
}

/// Stamps outgoing calls with the internal secret, the calling service and the trace context.
#[derive(Clone)]
pub struct Internal {
    secret: MetadataValue<tonic::metadata::Ascii>,
    service: MetadataValue<tonic::metadata::Ascii>,
}

impl Interceptor for Internal {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata_mut();
        md.insert(INTERNAL_SECRET_KEY, self.secret.clone());
        md.insert(SERVICE_KEY, self.service.clone());
        let tp = telemetry::current_traceparent();
        if !tp.is_empty()
            && let Ok(v) = tp.parse()
        {
            md.insert("traceparent", v);
        }
        Ok(req)
    }
}

type Ic = InterceptedService<Channel, Internal>;

/// Lazily connected clients of every service, acting as one named service.
#[derive(Clone)]
pub struct Clients {
    pub auth: AuthServiceClient<Ic>,
    pub storage: StorageServiceClient<Ic>,
    pub session: SessionServiceClient<Ic>,
    pub quota: QuotaServiceClient<Ic>,
    pub submission: SubmissionServiceClient<Ic>,
    pub leaderboard: LeaderboardServiceClient<Ic>,
}

/// Why clients could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error("invalid address `{addr}` for the {service} service: {source}")]
    Address {
        service: &'static str,
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("internal secret or service name is not valid metadata")]
    Metadata,
}

/// Makes a lazily connected channel to `addr`.
pub fn channel(service: &'static str, addr: &str) -> Result<Channel, ClientsError> {
    let ep = Endpoint::from_shared(addr.to_string()).map_err(|source| ClientsError::Address {
        service,
        addr: addr.to_string(),
        source,
    })?;
    Ok(ep
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy())
}

impl Clients {
    /// Builds clients of every service for the service named `me`.
    pub fn new(addrs: &ServiceAddrs, secret: &str, me: &str) -> Result<Self, ClientsError> {
        let ic = Internal {
            secret: secret.parse().map_err(|_| ClientsError::Metadata)?,
            service: me.parse().map_err(|_| ClientsError::Metadata)?,
        };
        let m = MAX_MESSAGE_BYTES;
        Ok(Self {
            auth: AuthServiceClient::with_interceptor(channel("auth", &addrs.auth)?, ic.clone())
                .max_decoding_message_size(m)
                .max_encoding_message_size(m),
            storage: StorageServiceClient::with_interceptor(
                channel("storage", &addrs.storage)?,
                ic.clone(),
            )
            .max_decoding_message_size(m)
            .max_encoding_message_size(m),
            session: SessionServiceClient::with_interceptor(
                channel("session", &addrs.session)?,
                ic.clone(),
            )
            .max_decoding_message_size(m)
            .max_encoding_message_size(m),
            quota: QuotaServiceClient::with_interceptor(
                channel("quota", &addrs.quota)?,
                ic.clone(),
            )
            .max_decoding_message_size(m)
            .max_encoding_message_size(m),
            submission: SubmissionServiceClient::with_interceptor(
                channel("submission", &addrs.submission)?,
                ic.clone(),
            )
            .max_decoding_message_size(m)
            .max_encoding_message_size(m),
            leaderboard: LeaderboardServiceClient::with_interceptor(
                channel("leaderboard", &addrs.leaderboard)?,
                ic,
            )
            .max_decoding_message_size(m)
            .max_encoding_message_size(m),
        })
    }
}
