//! Clients of the other services, reached by address from configuration in both deployments. Every call
//! goes through [`retry::Retrying`], so a call made while the service called restarts waits for it to return.

pub mod datasets;
pub mod retry;

use crate::error::ErrorCode;
use nsml_proto::internal::v1::{
    auth_internal_client::AuthInternalClient, quota_internal_client::QuotaInternalClient,
    session_internal_client::SessionInternalClient, storage_internal_client::StorageInternalClient,
    submission_internal_client::SubmissionInternalClient,
};
use nsml_proto::v1::{
    auth_service_client::AuthServiceClient, leaderboard_service_client::LeaderboardServiceClient,
    quota_service_client::QuotaServiceClient, session_service_client::SessionServiceClient,
    storage_service_client::StorageServiceClient,
    submission_service_client::SubmissionServiceClient,
};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::{Interceptor, Routes};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};

use crate::caller::{INTERNAL_SECRET_KEY, SERVICE_KEY};
use crate::server::InternalGuard;
use crate::service::Service;
use crate::telemetry;
use crate::tls::Tls;

/// Largest gRPC message the platform sends or accepts (predictions of a big test set).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Where each service listens (`http://host:port`, or `https://host:port` with TLS).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAddrs {
    pub auth: String,
    pub storage: String,
    pub session: String,
    pub quota: String,
    pub submission: String,
    pub leaderboard: String,
    /// Set when every service runs in this process (the embedded deployment): calls go straight into its
    /// router, behind the same internal guard as the network server, instead of over loopback TCP.
    #[serde(skip)]
    pub local: Option<LocalRoutes>,
    /// Set when the deployment configures TLS: every channel to a service connects with it.
    #[serde(skip)]
    pub tls: Option<Tls>,
}

impl ServiceAddrs {
    /// Every service at the address `f` gives it.
    pub fn from_fn(f: impl Fn(Service) -> String) -> Self {
        Self {
            auth: f(Service::Auth),
            storage: f(Service::Storage),
            session: f(Service::Session),
            quota: f(Service::Quota),
            submission: f(Service::Submission),
            leaderboard: f(Service::Leaderboard),
            local: None,
            tls: None,
        }
    }

    /// Every service at one address (one process serving them all, or a test's one server).
    pub fn all_at(addr: &str) -> Self {
        Self::from_fn(|_| addr.to_string())
    }

    /// Where `service` listens.
    pub fn get(&self, service: Service) -> &str {
        match service {
            Service::Auth => &self.auth,
            Service::Storage => &self.storage,
            Service::Session => &self.session,
            Service::Quota => &self.quota,
            Service::Submission => &self.submission,
            Service::Leaderboard => &self.leaderboard,
        }
    }

    /// Reaches `service`: in this process when every service is local, else over a channel, with TLS when
    /// it is configured.
    pub fn transport(&self, service: Service) -> Result<Transport, ClientsError> {
        transport_tls(
            service.name(),
            self.get(service),
            self.local.as_ref(),
            self.tls.as_ref(),
        )
    }
}

/// How one service is reached: a network channel, or this process's own router.
pub type Transport = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    TransportError,
>;

/// Why a call could not reach its service. A concrete type rather than a boxed error, so that futures holding
/// it stay `Send` for every lifetime inside `async_trait` methods.
#[derive(Debug)]
pub struct TransportError(BoxError);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// The routes of every service in this process, filled in once they are built (services need clients of each
/// other before the routes exist). A call before then is answered `Unavailable`.
#[derive(Clone, Default)]
pub struct LocalRoutes(Arc<OnceLock<InternalGuard<Routes>>>);

impl std::fmt::Debug for LocalRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "LocalRoutes(ready)"
        } else {
            "LocalRoutes(pending)"
        })
    }
}

impl LocalRoutes {
    /// Makes `routes`, guarded by `secret`, the target of every local call; only the first call takes effect.
    pub fn set(&self, routes: Routes, secret: Arc<str>) {
        let _ = self.0.set(InternalGuard::new(routes, secret));
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for LocalRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = TransportError;
    type Future = BoxFuture<'static, Result<Self::Response, TransportError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match self.0.get() {
            Some(routes) => {
                let call = routes.clone().oneshot(req);
                Box::pin(async move { call.await.map_err(|e| TransportError(e.into())) })
            }
            None => Box::pin(async {
                Ok(ErrorCode::Unavailable
                    .status("the platform is still starting, retry shortly")
                    .into_http())
            }),
        }
    }
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

type Ic = InterceptedService<Transport, Internal>;

/// Lazily connected clients of every service, acting as one named service.
#[derive(Clone)]
pub struct Clients {
    pub auth: AuthServiceClient<Ic>,
    pub storage: StorageServiceClient<Ic>,
    pub session: SessionServiceClient<Ic>,
    pub quota: QuotaServiceClient<Ic>,
    pub submission: SubmissionServiceClient<Ic>,
    pub leaderboard: LeaderboardServiceClient<Ic>,
    /// The platform's internal calls (`nsml.internal.v1`), to the same services.
    pub auth_internal: AuthInternalClient<Ic>,
    pub storage_internal: StorageInternalClient<Ic>,
    pub session_internal: SessionInternalClient<Ic>,
    pub quota_internal: QuotaInternalClient<Ic>,
    pub submission_internal: SubmissionInternalClient<Ic>,
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
    channel_tls(service, addr, None)
}

/// Makes a lazily connected channel to `addr`, over TLS when `tls` is given (the address is then
/// `https://…`).
pub fn channel_tls(
    service: &'static str,
    addr: &str,
    tls: Option<&Tls>,
) -> Result<Channel, ClientsError> {
    let address = |source| ClientsError::Address {
        service,
        addr: addr.to_string(),
        source,
    };
    let mut ep = Endpoint::from_shared(addr.to_string()).map_err(address)?;
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.client_config()).map_err(address)?;
    }
    Ok(ep
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy())
}

/// Reaches `service` at `addr` in clear text, or in this process when `local` is given.
pub fn transport(
    service: &'static str,
    addr: &str,
    local: Option<&LocalRoutes>,
) -> Result<Transport, ClientsError> {
    transport_tls(service, addr, local, None)
}

/// Reaches `service` at `addr`, over TLS when `tls` is given, or in this process when `local` is given.
fn transport_tls(
    service: &'static str,
    addr: &str,
    local: Option<&LocalRoutes>,
    tls: Option<&Tls>,
) -> Result<Transport, ClientsError> {
    Ok(match local {
        Some(routes) => BoxCloneSyncService::new(routes.clone()),
        None => BoxCloneSyncService::new(
            channel_tls(service, addr, tls)?.map_err(|e| TransportError(BoxError::from(e))),
        ),
    })
}

impl Clients {
    /// Builds clients of every service for the service named `me`; their calls are retried through a
    /// restart of the service called, as [`retry`] describes.
    pub fn new(addrs: &ServiceAddrs, secret: &str, me: &str) -> Result<Self, ClientsError> {
        let channel = |service: Service| -> Result<Transport, ClientsError> {
            Ok(BoxCloneSyncService::new(retry::Retrying::new(
                addrs.transport(service)?,
                retry::Backoff::THROUGH_RESTART,
            )))
        };
        let ic = Internal {
            secret: secret.parse().map_err(|_| ClientsError::Metadata)?,
            service: me.parse().map_err(|_| ClientsError::Metadata)?,
        };
        let m = MAX_MESSAGE_BYTES;
        // Every client of one service shares its channel, sized for the platform's largest messages.
        macro_rules! client {
            ($client:ident, $service:expr) => {
                $client::with_interceptor(channel($service)?, ic.clone())
                    .max_decoding_message_size(m)
                    .max_encoding_message_size(m)
            };
        }
        Ok(Self {
            auth: client!(AuthServiceClient, Service::Auth),
            storage: client!(StorageServiceClient, Service::Storage),
            session: client!(SessionServiceClient, Service::Session),
            quota: client!(QuotaServiceClient, Service::Quota),
            submission: client!(SubmissionServiceClient, Service::Submission),
            leaderboard: client!(LeaderboardServiceClient, Service::Leaderboard),
            auth_internal: client!(AuthInternalClient, Service::Auth),
            storage_internal: client!(StorageInternalClient, Service::Storage),
            session_internal: client!(SessionInternalClient, Service::Session),
            quota_internal: client!(QuotaInternalClient, Service::Quota),
            submission_internal: client!(SubmissionInternalClient, Service::Submission),
        })
    }
}
