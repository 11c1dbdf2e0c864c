//! The auth service served for real: a fresh SQLite log, the in-process bus and its relay, the service on
//! 127.0.0.1:0 behind the internal guard. What a caller sees of logins and tokens, codes included.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::caller::{INTERNAL_SECRET_KEY, SERVICE_KEY};
use nsml_common::error::ErrorCode;
use nsml_common::server::{random_secret, serve};
use nsml_eventstore::{EventStore, SqliteStore};
use nsml_proto::internal::v1::AuthenticateRequest;
use nsml_proto::internal::v1::auth_internal_client::AuthInternalClient;
use nsml_proto::v1::LoginRequest;
use nsml_proto::v1::auth_service_client::AuthServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

struct Harness {
    client: AuthServiceClient<Channel>,
    internal: AuthInternalClient<Channel>,
    secret: String,
    admin_token: String,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn EventStore> = Arc::new(
            SqliteStore::open(&dir.path().join("log.db"))
                .await
                .expect("open the log"),
        );
        let bus = nsml_bus::InProcessBus::new();
        let cancel = CancellationToken::new();
        nsml_bus::spawn_relay(store.clone(), bus.clone(), cancel.clone());
        let secret = random_secret();
        let data_dir = dir.path().join("auth");
        let ctx = ServiceContext {
            store,
            bus,
            addrs: Default::default(),
            secret: secret.clone().into(),
            data_dir: data_dir.clone(),
            cancel: cancel.clone(),
            executor: None,
        };
        let started = nsml_auth::start(ctx).await.expect("start");
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("the admin token file")
            .trim()
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let routes = (started.routes)(tonic::service::Routes::default());
        let names = started.names;
        let (serve_secret, serve_cancel): (Arc<str>, _) = (secret.clone().into(), cancel.clone());
        tokio::spawn(async move {
            serve(listener, routes, &names, serve_secret, serve_cancel)
                .await
                .expect("serve");
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        Harness {
            client: AuthServiceClient::new(channel.clone()),
            internal: AuthInternalClient::new(channel),
            secret,
            admin_token,
            cancel,
            _dir: dir,
        }
    }

    /// A request as the gateway (a platform service) sends it.
    fn internal<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert(
            INTERNAL_SECRET_KEY,
            self.secret.parse().expect("ascii secret"),
        );
        md.insert(SERVICE_KEY, "gateway".parse().expect("ascii"));
        req
    }

    async fn login(&self, username: &str, password: &str) -> Result<(), tonic::Status> {
        let req = self.internal(LoginRequest {
            username: username.into(),
            password: password.into(),
        });
        self.client.clone().login(req).await.map(|_| ())
    }
}

#[tokio::test]
async fn wrong_passwords_are_refused_then_lock_the_user_at_that_address() {
    let h = Harness::start().await;
    for _ in 0..5 {
        let err = h.login("alice", "guess").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "wrong username or password");
        assert_eq!(ErrorCode::of(&err), Some(ErrorCode::LoginFailed));
    }
    let locked = h.login("alice", "guess").await.unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted);
    assert!(
        locked
            .message()
            .starts_with("too many failed logins for `alice` from your address: try again in "),
        "{}",
        locked.message()
    );
    assert_eq!(ErrorCode::of(&locked), Some(ErrorCode::LockedOut));
    let wait: i64 = nsml_common::error::metadata(&locked)["retry_after_secs"]
        .parse()
        .expect("a number of seconds");
    assert!((1..=60).contains(&wait), "{wait}");
}

#[tokio::test]
async fn a_token_stands_for_its_user_until_it_is_not_known() {
    let h = Harness::start().await;
    let id = h
        .internal
        .clone()
        .authenticate(h.internal(AuthenticateRequest {
            token: h.admin_token.clone(),
        }))
        .await
        .expect("the admin token is valid")
        .into_inner();
    assert_eq!(id.username, "admin");
    assert!(id.admin);

    let err = h
        .internal
        .clone()
        .authenticate(h.internal(AuthenticateRequest {
            token: "not-a-token".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        err.message(),
        "your login has expired or was ended: run `nsml login` again"
    );
    assert_eq!(ErrorCode::of(&err), Some(ErrorCode::Unauthenticated));
}
