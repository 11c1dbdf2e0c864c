//! The auth service: users, teams, competitions and their membership, and login tokens.
//!
//! Passwords are kept as argon2id hashes; tokens are 256 random bits that are stored only as their SHA-256,
//! expire (160 hours by default, as NSML logins did) and are revoked by `logout`. Every change is an event;
//! the service's state is a projection of the log.

//!
//! The crate reads top-down: `domain` (rules), `projection` (the read model), `handler` (commands), `grpc`
//! (the API), `error` (what it refuses and how that travels).

mod domain;
mod error;
mod grpc;
mod handler;
mod projection;

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::v1::auth_service_server::AuthServiceServer;

pub use domain::{TOKEN_TTL_MS, hash_password, hash_token};
pub use error::AuthError;
pub use grpc::AuthService;

/// Builds the auth service: rebuilds its state from the log, makes sure the platform administrator exists and
/// writes a fresh host token to `DATA_DIR/admin.token`.
pub async fn start(ctx: ServiceContext) -> Result<Started, AuthError> {
    let (proj, task) = Projection::<projection::AuthState>::spawn(
        "auth",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
    );
    let readiness = proj.readiness();
    proj.wait_ready().await;
    let core = Arc::new(handler::Auth::new(ctx.store.clone(), proj));
    let token = core.bootstrap_admin().await?;
    let path = ctx.data_dir.join("admin.token");
    write_secret_file(&path, &token).map_err(|source| AuthError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let api = AuthService::new(core);
    let internal =
        nsml_proto::internal::v1::auth_internal_server::AuthInternalServer::new(api.clone());
    let server = AuthServiceServer::new(api)
        .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| {
            r.add_service(server).add_service(internal)
        }),
        names: vec!["nsml.v1.AuthService", "nsml.internal.v1.AuthInternal"],
        tasks: vec![task],
        ready: vec![readiness],
    })
}

fn write_secret_file(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(tmp, path)
}

/// Keeps the projection type nameable for tests.
pub type AuthProjection = Arc<Projection<projection::AuthState>>;
