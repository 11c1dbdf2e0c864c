//! The connection to the gateway: one lazily connected channel, every service's client on it, and the bearer
//! token on every call.

use std::time::Duration;

use anyhow::{Result, bail};
use nsml_proto::v1::auth_service_client::AuthServiceClient;
use nsml_proto::v1::leaderboard_service_client::LeaderboardServiceClient;
use nsml_proto::v1::quota_service_client::QuotaServiceClient;
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::storage_service_client::StorageServiceClient;
use nsml_proto::v1::submission_service_client::SubmissionServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::UsageError;

/// Responses (log batches, listings) may exceed tonic's 4 MiB default.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Adds `authorization: Bearer TOKEN` to every call, when there is a token, and the command's `traceparent`
/// when it is traced.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        if let Some(traceparent) = crate::trace::traceparent() {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.clone());
        }
        Ok(request)
    }
}

/// The transport every client uses.
pub type Authed = InterceptedService<Channel, Bearer>;

/// The gateway at one address, with or without a token.
#[derive(Debug, Clone)]
pub struct Api {
    channel: Channel,
    bearer: Bearer,
    token: Option<String>,
}

macro_rules! client {
    ($name:ident, $client:ident) => {
        pub fn $name(&self) -> $client<Authed> {
            $client::with_interceptor(self.channel.clone(), self.bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE)
        }
    };
}

impl Api {
    /// Prepares a channel to `server`; nothing connects until the first call, so an unreachable server shows up
    /// as that call's UNAVAILABLE status.
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        let endpoint = Endpoint::from_shared(server.to_string())
            .map_err(|e| UsageError(format!("invalid server address `{server}`: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let bearer = match &token {
            None => Bearer(None),
            Some(token) => match format!("Bearer {token}").parse() {
                Ok(value) => Bearer(Some(value)),
                Err(_) => {
                    bail!("the token holds characters that cannot be sent; run `nsml login` again")
                }
            },
        };
        Ok(Self {
            channel: endpoint.connect_lazy(),
            bearer,
            token,
        })
    }

    /// Returns the token calls carry.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Returns the bare channel, for callers that add the token themselves.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    client!(auth, AuthServiceClient);
    client!(storage, StorageServiceClient);
    client!(session, SessionServiceClient);
    client!(leaderboard, LeaderboardServiceClient);
    client!(submission, SubmissionServiceClient);
    client!(quota, QuotaServiceClient);
}

/// Returns whether a status was produced by the client's transport (no connection, connection lost) rather than
/// sent by the server: tonic keeps the transport error as the status's source.
pub fn is_local(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}
