//! Uploads, as a participant makes them through the gateway: every malformed code archive (absolute paths,
//! `..`, links out of the tree or through other links, device files and pipes, too many files, too many
//! bytes under a limit the operator set) is refused with the entry named and stores nothing; `nsml run`
//! leaves out what `.nsmlignore` lists; checkpoint names with path tricks are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use anyhow::{Context, ensure};
use flate2::Compression;
use flate2::write::GzEncoder;
use nsml_integration_tests::grpc::{Client, authed};
use nsml_integration_tests::{Deployment, repo_root};
use nsml_proto::v1::storage_service_client::StorageServiceClient;
use nsml_proto::v1::submission_service_client::SubmissionServiceClient;
use nsml_proto::v1::{
    DeleteCheckpointRequest, DownloadCodeRequest, ListSessionsRequest, SubmitRequest,
    UploadCodeChunk, UploadCodeMeta, UsageRequest, session_service_client::SessionServiceClient,
    upload_code_chunk,
};
use tar::{EntryType, Header};
use tokio_stream::StreamExt;
use tonic::Code;

/// The limits the deployment under test is started with.
const LIMITS: [(&str, &str); 2] = [("NSML_CODE_LIMIT", "64K"), ("NSML_CODE_FILES", "20")];

/// An archive entry, written raw (the tar crate's builder refuses the names these tests send).
enum E<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Special(&'a str, EntryType),
}

fn targz(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for e in entries {
        let (name, ty, data, link): (&str, EntryType, &[u8], Option<&str>) = match e {
            E::File(n, d) => (n, EntryType::Regular, d, None),
            E::Dir(n) => (n, EntryType::Directory, b"", None),
            E::Symlink(n, t) => (n, EntryType::Symlink, b"", Some(t)),
            E::HardLink(n, t) => (n, EntryType::Link, b"", Some(t)),
            E::Special(n, ty) => (n, *ty, b"", None),
        };
        let mut h = Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if let Some(gnu) = h.as_gnu_mut() {
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(t) = link {
                gnu.linkname[..t.len()].copy_from_slice(t.as_bytes());
            }
        }
        h.set_cksum();
        b.append(&h, data).expect("appending to memory");
    }
    b.into_inner()
        .and_then(|gz| gz.finish())
        .expect("finishing in memory")
}

/// Bytes that do not compress, so that the archive is as large as they are.
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn upload(alice: &Client, archive: Vec<u8>) -> Result<String, tonic::Status> {
    let chunks = vec![
        UploadCodeChunk {
            kind: Some(upload_code_chunk::Kind::Meta(UploadCodeMeta {
                dataset: "t1-cls".into(),
            })),
        },
        UploadCodeChunk {
            kind: Some(upload_code_chunk::Kind::Data(archive)),
        },
    ];
    let req = authed(tokio_stream::iter(chunks), &alice.token)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    StorageServiceClient::new(alice.channel.clone())
        .upload_code(req)
        .await
        .map(|r| r.into_inner().id)
}

async fn code_bytes(alice: &Client) -> anyhow::Result<u64> {
    Ok(StorageServiceClient::new(alice.channel.clone())
        .usage(authed(
            UsageRequest {
                team: "demo".into(),
            },
            &alice.token,
        )?)
        .await?
        .into_inner()
        .code_bytes)
}

/// Every malformed archive is refused, naming what is wrong, and nothing of it is stored.
async fn malformed_archives(alice: &Client) -> anyhow::Result<()> {
    let big = noise(100 * 1024);
    let many: Vec<String> = (0..21).map(|i| format!("f{i}.py")).collect();
    let many_entries: Vec<E> = many.iter().map(|n| E::File(n, b"")).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absolute path",
            targz(&[E::File("main.py", b""), E::File("/etc/cron.d/x", b"")]),
            "entry `/etc/cron.d/x` has an absolute path",
        ),
        (
            "`..`",
            targz(&[E::File("main.py", b""), E::File("lib/../../x.py", b"")]),
            "entry `lib/../../x.py` leaves the archive through `..`",
        ),
        (
            "symlink out",
            targz(&[E::File("main.py", b""), E::Symlink("data", "../../../etc")]),
            "symlink `data` points outside the archive",
        ),
        (
            "absolute symlink",
            targz(&[E::File("main.py", b""), E::Symlink("keys", "/root/.ssh")]),
            "symlink `keys` points to an absolute path",
        ),
        (
            "symlink through a symlink",
            targz(&[
                E::Dir("sub"),
                E::Symlink("here", "sub"),
                E::Symlink("out", "here/x.py"),
            ]),
            "symlink `out` resolves through symlink `here`",
        ),
        (
            "entry beneath a symlink",
            targz(&[
                E::Dir("sub"),
                E::Symlink("link", "sub"),
                E::File("link/x.py", b""),
            ]),
            "entry `link/x.py` lies beneath symlink `link`",
        ),
        (
            "hard link out",
            targz(&[
                E::File("main.py", b""),
                E::HardLink("h", "../../etc/shadow"),
            ]),
            "hard link `h` points outside the archive",
        ),
        (
            "character device",
            targz(&[E::File("main.py", b""), E::Special("tty", EntryType::Char)]),
            "entry `tty` is a device file or pipe",
        ),
        (
            "block device",
            targz(&[E::Special("sda", EntryType::Block)]),
            "entry `sda` is a device file or pipe",
        ),
        (
            "pipe",
            targz(&[E::Special("fifo", EntryType::Fifo)]),
            "entry `fifo` is a device file or pipe",
        ),
        (
            "too many files",
            targz(&many_entries),
            "it has more than 20 entries",
        ),
        (
            "too large",
            targz(&[E::File("weights.bin", &big)]),
            "code upload is larger than the 64 KB limit",
        ),
        (
            "not an archive",
            b"#!/bin/sh\nrm -rf /\n".to_vec(),
            "it is not a readable gzip'd tar",
        ),
    ];
    let before = code_bytes(alice).await?;
    let mut wrong = Vec::new();
    for (what, archive, expected) in cases {
        match upload(alice, archive).await {
            Ok(id) => wrong.push(format!("{what}: stored as snapshot {id}")),
            Err(s) if s.code() == Code::InvalidArgument && s.message().contains(expected) => {}
            Err(s) => wrong.push(format!(
                "{what}: expected INVALID_ARGUMENT with `{expected}`, got {:?} `{}`",
                s.code(),
                s.message()
            )),
        }
    }
    ensure!(
        wrong.is_empty(),
        "malformed uploads not refused as they should be:\n{}",
        wrong.join("\n")
    );
    ensure!(
        code_bytes(alice).await? == before,
        "refused uploads were counted as stored"
    );
    // Just under both limits passes.
    let fine: Vec<E> = many
        .iter()
        .take(20)
        .map(|n| E::File(n, b"print(1)\n"))
        .collect();
    upload(alice, targz(&fine))
        .await
        .context("an archive of 20 files")?;
    upload(alice, targz(&[E::File("w.bin", &noise(60 * 1024))]))
        .await
        .context("an archive under 64 KB")?;
    Ok(())
}

/// `nsml run` leaves out what `.nsmlignore` lists (here, data that would break the size limit), and the
/// uploaded snapshot holds only the rest.
fn nsmlignore_is_honoured(
    rt: &tokio::runtime::Runtime,
    dep: &Deployment,
    alice: &Client,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let dir = work.path();
    std::fs::write(dir.join("main.py"), "print('trained')\n")?;
    std::fs::write(dir.join(".nsmlignore"), "data/\n*.ckpt\n")?;
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::write(dir.join("data/big.bin"), noise(200 * 1024))?;
    std::fs::write(dir.join("old.ckpt"), noise(10))?;
    let mut user = dep.user("alice-cli");
    user.token = Some(alice.token.clone());
    let out = user
        .nsml_in(
            dir,
            &["run", "-d", "t1-cls", "-g", "0", "--memory", "1G"],
            "",
        )?
        .ok()?;
    ensure!(
        out.all().contains(".nsmlignore check - done"),
        "no .nsmlignore check in: {}",
        out.all()
    );
    let names = rt.block_on(async {
        let sessions = SessionServiceClient::new(alice.channel.clone())
            .list(authed(
                ListSessionsRequest {
                    all: true,
                    ..Default::default()
                },
                &alice.token,
            )?)
            .await?
            .into_inner()
            .sessions;
        let snapshot = sessions
            .last()
            .map(|s| s.code_snapshot.clone())
            .context("no session started")?;
        let mut stream = StorageServiceClient::new(alice.channel.clone())
            .download_code(authed(DownloadCodeRequest { id: snapshot }, &alice.token)?)
            .await?
            .into_inner();
        let mut archive = Vec::new();
        while let Some(c) = stream.next().await {
            archive.extend(c?.data);
        }
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(archive.as_slice()));
        let mut names = Vec::new();
        for e in ar.entries()? {
            names.push(e?.path()?.display().to_string());
        }
        anyhow::Ok(names)
    })?;
    ensure!(
        names.iter().any(|n| n == "main.py")
            && !names
                .iter()
                .any(|n| n.starts_with("data") || n.ends_with(".ckpt")),
        "the uploaded snapshot holds {names:?}"
    );
    Ok(())
}

/// Checkpoint names with path tricks are refused wherever a client names one.
async fn checkpoint_names(alice: &Client, session: &str) -> anyhow::Result<()> {
    for bad in ["../0", "..", "a/b", "x\0y", ""] {
        let submit = SubmissionServiceClient::new(alice.channel.clone())
            .submit(authed(
                SubmitRequest {
                    session: session.into(),
                    checkpoint: bad.into(),
                    trial: true,
                },
                &alice.token,
            )?)
            .await;
        ensure!(
            matches!(&submit, Err(s) if s.code() == Code::InvalidArgument && s.message().contains("invalid checkpoint name")),
            "submitting checkpoint {bad:?}: {submit:?}"
        );
        let delete = StorageServiceClient::new(alice.channel.clone())
            .delete_checkpoint(authed(
                DeleteCheckpointRequest {
                    session: session.into(),
                    checkpoint: bad.into(),
                },
                &alice.token,
            )?)
            .await;
        ensure!(
            matches!(&delete, Err(s) if s.code() == Code::InvalidArgument),
            "deleting checkpoint {bad:?}: {delete:?}"
        );
    }
    Ok(())
}

#[test]
fn uploads_are_checked() -> anyhow::Result<()> {
    let dep = Deployment::embedded_env(&[], &LIMITS)?;
    let rt = tokio::runtime::Runtime::new()?;
    let alice = rt.block_on(Client::login(&dep.url, "alice", "alice-pass"))?;
    rt.block_on(malformed_archives(&alice))?;
    nsmlignore_is_honoured(&rt, &dep, &alice)?;
    let session = rt.block_on(async {
        let main = std::fs::read_to_string(repo_root().join("examples/baseline/main.py"))?;
        let snap = alice.upload("t1-cls", &[("main.py", &main)]).await?;
        let s = alice
            .run(
                "t1-cls",
                &snap,
                "--epochs 1",
                nsml_integration_tests::grpc::small(),
            )
            .await?;
        alice.wait_session(&s.name).await?;
        anyhow::Ok(s.name)
    })?;
    rt.block_on(checkpoint_names(&alice, &session))
}
