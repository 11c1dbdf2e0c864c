//! Hostile input at the public endpoint: requests that are not messages, names of any size, and floods of wrong
//! logins. Each is refused with a clear status, and none keeps a user out of their own account.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, ensure};
use bytes::{Buf, BufMut};
use nsml_integration_tests::Deployment;
use nsml_proto::error::ErrorCode;
use nsml_proto::v1::LoginRequest;
use nsml_proto::v1::auth_service_client::AuthServiceClient;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

/// Sends whatever bytes it is given as the request, and takes the answer's bytes as they come.
#[derive(Default)]
struct RawCodec;

struct Raw;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let out = src.chunk().to_vec();
        src.advance(out.len());
        Ok(Some(out))
    }
}

async fn channel(url: &str, from: Ipv4Addr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .local_address(Some(IpAddr::V4(from)))
        .connect()
        .await?)
}

async fn send_raw(
    ch: Channel,
    method: &'static str,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(body);
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("a hex token is ASCII"),
        );
    }
    grpc.unary(req, http::uri::PathAndQuery::from_static(method), RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

async fn login(ch: Channel, user: &str, password: &str) -> Result<String, tonic::Status> {
    AuthServiceClient::new(ch)
        .max_encoding_message_size(64 << 20)
        .login(LoginRequest {
            username: user.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

/// Bytes that are no protobuf message: a field tag with wire type 7, which does not exist.
const GARBAGE: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0x0f, 0x07, 0x01];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_naming_the_message() -> anyhow::Result<()> {
    let d = Deployment::embedded()?;
    let ch = channel(&d.url, Ipv4Addr::LOCALHOST).await?;
    let err = send_raw(
        ch.clone(),
        "/nsml.v1.AuthService/Login",
        GARBAGE.to_vec(),
        None,
    )
    .await
    .expect_err("garbage is not a login");
    ensure!(err.code() == Code::InvalidArgument, "{err:?}");
    ensure!(
        ErrorCode::of(&err) == Some(ErrorCode::BadRequest),
        "{err:?}"
    );
    ensure!(
        err.message()
            .starts_with("the request is not a valid nsml.v1.LoginRequest message"),
        "{err:?}"
    );
    let admin = d.admin_token()?;
    let err = send_raw(
        ch,
        "/nsml.v1.SessionService/Memo",
        GARBAGE.to_vec(),
        Some(&admin),
    )
    .await
    .expect_err("garbage is not a memo");
    ensure!(err.code() == Code::InvalidArgument, "{err:?}");
    ensure!(err.message().contains("nsml.v1.MemoRequest"), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_logins_from_elsewhere_never_lock_a_user_out() -> anyhow::Result<()> {
    let d = Deployment::embedded()?;
    let attacker = channel(&d.url, Ipv4Addr::new(127, 0, 0, 2)).await?;
    let owner = channel(&d.url, Ipv4Addr::LOCALHOST).await?;

    // A name of 30 MiB is refused for its size before anything is looked up or counted.
    let err = login(attacker.clone(), &"x".repeat(30 << 20), "guess")
        .await
        .expect_err("no such user");
    ensure!(err.code() == Code::InvalidArgument, "{err:?}");
    ensure!(
        err.message() == "username is 31457280 bytes; the limit is 63 bytes",
        "{err:?}"
    );

    for _ in 0..5 {
        let err = login(attacker.clone(), "alice", "wrong")
            .await
            .expect_err("a wrong password");
        ensure!(err.code() == Code::Unauthenticated, "{err:?}");
        ensure!(
            ErrorCode::of(&err) == Some(ErrorCode::LoginFailed),
            "{err:?}"
        );
    }
    let err = login(attacker.clone(), "alice", "alice-pass")
        .await
        .expect_err("the attacker's address is locked for alice");
    ensure!(err.code() == Code::ResourceExhausted, "{err:?}");
    ensure!(ErrorCode::of(&err) == Some(ErrorCode::LockedOut), "{err:?}");
    login(owner, "alice", "alice-pass")
        .await
        .context("alice logs in from her own address")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_memo_is_refused_with_its_size_and_the_limit() -> anyhow::Result<()> {
    let d = Deployment::embedded()?;
    let ch = channel(&d.url, Ipv4Addr::LOCALHOST).await?;
    let token = login(ch.clone(), "alice", "alice-pass").await?;
    let mut req = tonic::Request::new(nsml_proto::v1::MemoRequest {
        name: "demo/t1-cls/1".into(),
        memo: "m".repeat(8 << 20),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let err = nsml_proto::v1::session_service_client::SessionServiceClient::new(ch)
        .max_encoding_message_size(64 << 20)
        .memo(req)
        .await
        .expect_err("8 MiB is no memo");
    ensure!(err.code() == Code::InvalidArgument, "{err:?}");
    ensure!(ErrorCode::of(&err) == Some(ErrorCode::TooLarge), "{err:?}");
    ensure!(
        err.message() == "memo is 8388608 bytes; the limit is 1024 bytes",
        "{err:?}"
    );
    Ok(())
}

/// What the gateway answers itself carries the platform's codes too: a method it does not know, and one that is
/// internal to the platform.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_refusals_carry_their_codes() -> anyhow::Result<()> {
    let d = Deployment::embedded()?;
    let ch = channel(&d.url, Ipv4Addr::LOCALHOST).await?;
    let err = send_raw(ch.clone(), "/nsml.v1.Nothing/Run", Vec::new(), None)
        .await
        .expect_err("no such service");
    ensure!(err.code() == Code::Unimplemented, "{err:?}");
    ensure!(
        ErrorCode::of(&err) == Some(ErrorCode::UnknownMethod),
        "{err:?}"
    );
    let admin = d.admin_token()?;
    let err = send_raw(
        ch,
        "/nsml.internal.v1.QuotaInternal/Admit",
        Vec::new(),
        Some(&admin),
    )
    .await
    .expect_err("internal");
    ensure!(err.code() == Code::PermissionDenied, "{err:?}");
    ensure!(
        ErrorCode::of(&err) == Some(ErrorCode::PermissionDenied),
        "{err:?}"
    );
    Ok(())
}
