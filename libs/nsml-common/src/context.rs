//! Everything a service needs from its deployment, handed in by `nsmld` (the one place that knows whether
//! the deployment is embedded or distributed).

use std::path::PathBuf;
use std::sync::Arc;

use nsml_bus::Bus;
use nsml_eventstore::EventStore;
use tokio_util::sync::CancellationToken;

use crate::clients::{Clients, ServiceAddrs};
use crate::executor::Executor;

/// The deployment as one service sees it.
#[derive(Clone)]
pub struct ServiceContext {
    pub store: Arc<dyn EventStore>,
    pub bus: Arc<dyn Bus>,
    pub addrs: ServiceAddrs,
    /// Shared secret every internal call carries.
    pub secret: Arc<str>,
    /// This service's own directory for files it owns (blobs, logs).
    pub data_dir: PathBuf,
    pub cancel: CancellationToken,
    /// Starts sessions' runners (the session service only).
    pub executor: Option<Arc<dyn Executor>>,
}

impl ServiceContext {
    /// Clients of the other services, acting as service `me`.
    pub fn clients(&self, me: &str) -> Result<Clients, crate::clients::ClientsError> {
        Clients::new(&self.addrs, &self.secret, me)
    }
}
