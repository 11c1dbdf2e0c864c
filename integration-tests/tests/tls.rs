//! The distributed deployment with mutual TLS between its processes: a participant's whole loop runs through
//! it (the gateway, every service and the sessions' runners calling each other over TLS), while every internal
//! port refuses a caller in clear text, a caller without a certificate, a caller whose certificate another CA
//! issued, and, with the right certificate, a call without the internal secret. With TLS on the servers only,
//! a session runs and the ports still refuse clear text. A `[tls]` table naming files that cannot be used
//! stops `nsmld serve` with a message that names the file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nsml_common::tls::testing::TestCa;
use nsml_integration_tests::{Deployment, FreshDb, bin, drop_stream, repo_root, scenario};
use nsml_proto::v1::Empty;
use nsml_proto::v1::auth_service_client::AuthServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn tls_table(dir: &Path) -> String {
    format!(
        "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nmutual = true\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        dir.join("ca.pem").display(),
    )
}

/// The internal services' addresses, from the `[services]` table of the deployment's configuration.
fn internal_addrs(dep: &Deployment) -> Vec<(String, String)> {
    let config = std::fs::read_to_string(dep.config_path().unwrap()).unwrap();
    let table = config.split("[services]").nth(1).unwrap();
    table
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// A channel to `addr`: in clear text when `tls` is `None`.
fn endpoint(addr: &str, tls: Option<ClientTlsConfig>) -> Endpoint {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10));
    match tls {
        Some(tls) => ep.tls_config(tls).unwrap(),
        None => ep,
    }
}

/// Asks `grpc.health.v1` (open to any caller that gets through TLS) at `addr`.
async fn health(addr: &str, tls: Option<ClientTlsConfig>) -> Result<(), tonic::Status> {
    let channel = endpoint(addr, tls).connect_lazy();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

async fn refusals(dep: &Deployment, ca: &TestCa, pki: &Path) -> anyhow::Result<()> {
    let ca_cert = Certificate::from_pem(&ca.cert_pem);
    let ours = Identity::from_pem(
        std::fs::read(pki.join("cert.pem"))?,
        std::fs::read(pki.join("key.pem"))?,
    );
    let stranger = TestCa::new("another CA")?.issue(&["127.0.0.1", "localhost"])?;
    let theirs = Identity::from_pem(&stranger.cert_pem, &stranger.key_pem);
    let trusting = || ClientTlsConfig::new().ca_certificate(ca_cert.clone());
    let addrs = internal_addrs(dep);
    assert_eq!(addrs.len(), 6, "{addrs:?}");
    for (service, addr) in &addrs {
        // With the deployment's certificate the port answers: the refusals below are TLS's, not a dead port.
        health(addr, Some(trusting().identity(ours.clone())))
            .await
            .unwrap_or_else(|s| {
                panic!("{service} at {addr} refused the deployment's certificate: {s:?}")
            });

        // (a) Clear text.
        let plain = health(addr, None).await;
        assert!(
            plain.is_err(),
            "{service} at {addr} answered a call in clear text"
        );

        // (b) TLS without a client certificate.
        let anonymous = health(addr, Some(trusting())).await;
        assert!(
            anonymous.is_err(),
            "{service} at {addr} answered a caller without a certificate"
        );

        // (c) A certificate another CA issued.
        let foreign = health(addr, Some(trusting().identity(theirs.clone()))).await;
        assert!(
            foreign.is_err(),
            "{service} at {addr} answered a caller whose certificate another CA issued"
        );

        // (d) The right certificate, but not the internal secret: the guard still refuses.
        let channel = endpoint(addr, Some(trusting().identity(ours.clone()))).connect_lazy();
        let status = AuthServiceClient::new(channel)
            .who_am_i(Empty::default())
            .await
            .expect_err("a call without the internal secret was answered");
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{service} at {addr}: {status:?}"
        );
        assert!(
            status.message().contains("only from the gateway"),
            "{service} at {addr}: {status:?}"
        );
        for (what, refused) in [
            ("clear text", plain),
            ("no certificate", anonymous),
            ("another CA", foreign),
        ] {
            let status = refused.unwrap_err();
            // Refused by TLS, before any gRPC: never an answer of the service or of its guard.
            assert_ne!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{service} at {addr}, {what}: {status:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn distributed_deployment_with_mutual_tls() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let pki = tempfile::tempdir()?;
    let ca = TestCa::new("nsml deployment CA")?;
    ca.write(pki.path(), &["127.0.0.1", "localhost"])?;
    let result = (|| {
        let dep = Deployment::distributed_with(
            &db.url,
            "nats://127.0.0.1:4222",
            &stream,
            &[],
            &tls_table(pki.path()),
        )?;
        let host = dep.host()?;
        host.nsml(&["admin", "competition", "apply", "examples/competition.toml"])?
            .ok()?;
        let work = tempfile::tempdir()?;
        scenario::participant_loop(&dep, work.path())?;
        rt.block_on(refusals(&dep, &ca, pki.path()))?;
        Ok::<_, anyhow::Error>(())
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}

/// TLS without client certificates: a session runs to its end, and the internal ports answer a TLS caller
/// without a certificate, never one in clear text.
#[test]
fn distributed_deployment_with_tls_only_on_the_servers() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let pki = tempfile::tempdir()?;
    let ca = TestCa::new("nsml deployment CA")?;
    ca.write(pki.path(), &["127.0.0.1"])?;
    let table = tls_table(pki.path()).replace("mutual = true", "mutual = false");
    let result = (|| {
        let dep =
            Deployment::distributed_with(&db.url, "nats://127.0.0.1:4222", &stream, &[], &table)?;
        dep.host()?
            .nsml(&["admin", "competition", "apply", "examples/competition.toml"])?
            .ok()?;
        let alice = scenario::login(&dep, "alice", "alice-pass")?;
        let work = tempfile::tempdir()?;
        scenario::baseline_copy(work.path())?;
        let s = scenario::run(&alice, work.path(), "t1-cls", &["-a", "--epochs 2"])?;
        let ended = scenario::wait_ended(&alice, &s)?;
        anyhow::ensure!(ended["status"] == "exited", "session ended as {ended}");
        let ca_cert = Certificate::from_pem(&ca.cert_pem);
        rt.block_on(async {
            for (service, addr) in internal_addrs(&dep) {
                health(
                    &addr,
                    Some(ClientTlsConfig::new().ca_certificate(ca_cert.clone())),
                )
                .await
                .unwrap_or_else(|s| panic!("{service} at {addr}: {s:?}"));
                assert!(
                    health(&addr, None).await.is_err(),
                    "{service} at {addr} answered a call in clear text"
                );
            }
        });
        Ok::<_, anyhow::Error>(())
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}

/// `nsmld serve auth` on a configuration whose `[tls]` table is `tls`: its exit status and what it printed.
fn serve_with(dir: &Path, tls: &str) -> (bool, String) {
    let config = dir.join("nsmld.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
store = "postgres://postgres@127.0.0.1:5432/nsml_tls_never_opened"
bus = "nats://127.0.0.1:4222"
internal_secret = "0123456789abcdef0123"
public_listen = "127.0.0.1:0"

[services]
auth = "127.0.0.1:1"
storage = "127.0.0.1:2"
session = "127.0.0.1:3"
quota = "127.0.0.1:4"
submission = "127.0.0.1:5"
leaderboard = "127.0.0.1:6"
{tls}"#,
            data = dir.join("data").display(),
        ),
    )
    .unwrap();
    let out = Command::new(bin("nsmld"))
        .args(["serve", "auth", "--config"])
        .arg(&config)
        .current_dir(repo_root())
        .output()
        .expect("cannot start nsmld (is the workspace built?)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unusable_tls_files_stop_the_server_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = TestCa::new("nsml deployment CA").unwrap();
    ca.write(&pki, &["127.0.0.1"]).unwrap();

    // A missing certificate, given relative to the configuration's directory.
    let (ok, err) = serve_with(
        dir.path(),
        "[tls]\ncert = \"pki/missing.pem\"\nkey = \"pki/key.pem\"\nca = \"pki/ca.pem\"\n",
    );
    assert!(!ok, "{err}");
    assert!(err.contains("tls.cert"), "{err}");
    assert!(
        err.contains(&pki.join("missing.pem").display().to_string()),
        "{err}"
    );

    // A key that is not the certificate's.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    ca.write(&other, &["127.0.0.1"]).unwrap();
    let (ok, err) = serve_with(
        dir.path(),
        "[tls]\ncert = \"pki/cert.pem\"\nkey = \"other/key.pem\"\nca = \"pki/ca.pem\"\n",
    );
    assert!(!ok, "{err}");
    assert!(err.contains("does not match the certificate"), "{err}");

    // A CA file that holds no certificate.
    std::fs::write(dir.path().join("junk.pem"), "junk\n").unwrap();
    let (ok, err) = serve_with(
        dir.path(),
        "[tls]\ncert = \"pki/cert.pem\"\nkey = \"pki/key.pem\"\nca = \"junk.pem\"\n",
    );
    assert!(!ok, "{err}");
    assert!(err.contains("tls.ca"), "{err}");
    assert!(err.contains("junk.pem"), "{err}");
}
