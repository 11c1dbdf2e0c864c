//! Authorization on every public call, in both deployments: every public method of every service, called
//! through the gateway as an anonymous caller, a participant of another team, a host of another competition,
//! the team's participant, a host of the competition and the platform administrator, answers exactly as the
//! access rules say; internal methods are refused through the gateway for everyone; metadata a client forges
//! is ignored; services called directly without the deployment's secret refuse; logins end with `logout`,
//! lock after repeated failures and leave only hashes of tokens in the log; a new membership applies from the
//! next call of a token the gateway resolved just before.
//!
//! The rules, per caller (see the table each test prints):
//! - a participant reaches only their own team's sessions, logs, metrics, checkpoints, code and submissions;
//! - logs and metrics of real submit sessions (which see the hidden test inputs) reach hosts only;
//! - the private leaderboard and private scores reach hosts only until revealed;
//! - hidden labels and test inputs (`FetchDatasetPart`) reach no caller through the gateway;
//! - host commands reach hosts of that competition only (the administrator hosts every competition);
//! - `Run`, `UploadCode` and `Submit` act for the caller's own team only, so hosts who are not in a team
//!   cannot spend a team's quota or submits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use nsml_integration_tests::access::{
    Callers, Matrix, Row, Who, call_raw, cell, codes::*, declared_methods,
    gateway_internal_methods, msg, path_of, with_live_views,
};
use nsml_integration_tests::grpc::{Client, authed, small, tar_gz};
use nsml_integration_tests::{Deployment, FreshDb, drop_stream, repo_root};
use nsml_proto::v1::{
    ApplyCompetitionRequest, BoardRequest, Competition, DatasetMeta, DatasetRef,
    DeleteCheckpointRequest, Direction, DownloadCodeRequest, Empty, FindCodeRequest,
    GetCompetitionRequest, GetDatasetRequest, GetSessionRequest, GetSubmissionRequest,
    HistoryRequest, HistoryResponse, Identity, ListCheckpointsRequest, ListDatasetsRequest,
    ListSessionsRequest, ListSessionsResponse, ListSubmissionsRequest, ListSubmissionsResponse,
    LoginRequest, LoginResponse, LogsRequest, Membership, MemoRequest, MetricsRequest,
    MetricsResponse, OverallRequest, PullCheckpointRequest, QuotaUsageRequest,
    RegisterDatasetChunk, RemoveRequest, RevealPrivateRequest, RunRequest, Session, StopRequest,
    Submission, SubmitRequest, UploadCodeChunk, UploadCodeMeta, UsageRequest, UserSpec,
    auth_service_client::AuthServiceClient, register_dataset_chunk, upload_code_chunk,
};
use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// Requests of the quota service's host commands, by field number: the matrix calls them by path, so it
/// does not depend on which of them this build's API already has (a missing one answers UNIMPLEMENTED and
/// is shown as `~`).
mod quota_requests {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OverrideRequest {
        #[prost(string, tag = "1")]
        pub competition: String,
        #[prost(string, tag = "2")]
        pub team: String,
        /// 1: an extra submit.
        #[prost(int32, tag = "3")]
        pub kind: i32,
        #[prost(string, tag = "4")]
        pub dataset: String,
        #[prost(string, tag = "8")]
        pub reason: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ByCompetition {
        #[prost(string, tag = "1")]
        pub competition: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ById {
        #[prost(string, tag = "1")]
        pub id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ByTeam {
        #[prost(string, tag = "1")]
        pub team: String,
    }
}

const ALREADY_EXISTS: Option<Code> = Some(Code::AlreadyExists);

/// What the matrix is about: the team's sessions, submissions and code, and the other team's.
struct World {
    callers: Callers,
    /// The team's training session with checkpoint `0`.
    train: String,
    /// The other team's training session.
    rival_train: String,
    /// The team's real submit session, and its submission.
    submit_session: String,
    submission: String,
    /// The team's trial submit session.
    trial_session: String,
    /// The team's code snapshot.
    snapshot: String,
    /// Ended sessions of the team, one per caller who removes one.
    spare: Vec<String>,
    /// The competition as applied.
    demo: Competition,
    /// Every token handed out, to look for in the log.
    tokens: Vec<String>,
}

/// The example baseline, reporting a metric when a submit runs it: the report is written by code that saw
/// the hidden test inputs, so only hosts may read it from a real submit.
fn reporting_baseline() -> anyhow::Result<String> {
    let main = std::fs::read_to_string(repo_root().join("examples/baseline/main.py"))?;
    let anchor = "from nsml import DATASET_PATH\n";
    ensure!(main.contains(anchor), "the baseline's imports changed");
    Ok(main.replacen(
        anchor,
        &format!(
            "{anchor}\nif \"--pause\" in sys.argv:\n    nsml.report(summary=True, step=0, probe=\"from-the-test-inputs\")\n"
        ),
        1,
    ))
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

async fn login(ch: &Channel, user: &str, password: &str) -> anyhow::Result<String> {
    Ok(AuthServiceClient::new(ch.clone())
        .login(LoginRequest {
            username: user.into(),
            password: password.into(),
        })
        .await
        .with_context(|| format!("logging in as {user}"))?
        .into_inner()
        .token)
}

/// Sets up both teams' sessions and submissions, and a second competition with its own host.
async fn world(dep: &Deployment) -> anyhow::Result<World> {
    let ch = channel(&dep.url).await?;
    let admin = dep.admin_token()?;
    let mut auth = AuthServiceClient::new(ch.clone());
    auth.apply_competition(authed(
        ApplyCompetitionRequest {
            competition: Some(Competition {
                id: "other".into(),
                title: "Another competition".into(),
                datasets: vec![DatasetRef {
                    name: "o1-cls".into(),
                    metric: "accuracy".into(),
                    direction: Direction::Descending as i32,
                }],
                hosts: vec!["ohost".into()],
                ..Default::default()
            }),
            users: vec![UserSpec {
                username: "ohost".into(),
                password: "ohost-pass".into(),
            }],
        },
        &admin,
    )?)
    .await
    .context("applying a second competition")?;
    let demo = auth
        .get_competition(authed(GetCompetitionRequest { id: "demo".into() }, &admin)?)
        .await?
        .into_inner();
    ensure!(
        demo.hosts == ["host"],
        "the example's hosts changed: {:?}",
        demo.hosts
    );

    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let bob = Client::login(&dep.url, "bob", "bob-pass").await?;
    let mut callers = Callers::default();
    callers.set(Who::Team, alice.token.clone());
    callers.set(Who::OtherTeam, bob.token.clone());
    callers.set(Who::Host, login(&ch, "host", "host-pass").await?);
    callers.set(Who::OtherHost, login(&ch, "ohost", "ohost-pass").await?);
    callers.set(Who::Admin, admin);

    let snapshot = alice
        .upload("t1-cls", &[("main.py", &reporting_baseline()?)])
        .await?;
    let train = alice
        .run("t1-cls", &snapshot, "--epochs 1", small())
        .await?;
    let done = alice.wait_session(&train.name).await?;
    ensure!(
        done.checkpoint_count > 0,
        "training {} saved nothing: {:?}",
        train.name,
        done
    );
    let quick = alice
        .upload("t1-cls", &[("main.py", "print('quick')\n")])
        .await?;
    let mut spare = Vec::new();
    for _ in 0..3 {
        let s = alice.run("t1-cls", &quick, "", small()).await?;
        alice.wait_session(&s.name).await?;
        spare.push(s.name);
    }
    let rival_train = bob.trained("t1-cls").await?;

    let real = alice.submit(&train.name, "0", false).await?;
    let real = alice.wait_scored(&real.id).await?;
    alice.wait_session(&real.session).await?;
    let trial = alice.submit(&train.name, "0", true).await?;
    let trial = alice.wait_scored(&trial.id).await?;
    alice.wait_session(&trial.session).await?;

    let tokens = callers.all_tokens().map(String::from).collect();
    Ok(World {
        callers,
        train: train.name,
        rival_train,
        submit_session: real.session,
        submission: real.id,
        trial_session: trial.session,
        snapshot,
        spare,
        demo,
        tokens,
    })
}

fn decode<M: Message + Default>(resp: &[Vec<u8>]) -> Result<M, String> {
    let first = resp.first().ok_or("no answer")?;
    M::decode(first.as_slice()).map_err(|e| e.to_string())
}

fn sessions(resp: &[Vec<u8>]) -> Result<Vec<Session>, String> {
    Ok(decode::<ListSessionsResponse>(resp)?.sessions)
}

/// `List` shows exactly the teams `teams` of the two in play (other competitions' callers see neither).
fn lists_teams(teams: &'static [&'static str]) -> impl Fn(&[Vec<u8>]) -> Result<(), String> {
    move |resp| {
        let shown: std::collections::BTreeSet<String> =
            sessions(resp)?.into_iter().map(|s| s.team).collect();
        let want: std::collections::BTreeSet<String> =
            teams.iter().map(|t| t.to_string()).collect();
        if shown == want {
            Ok(())
        } else {
            Err(format!("lists teams {shown:?}, expected {want:?}"))
        }
    }
}

fn summary_of(s: &Session, hidden: bool) -> Result<(), String> {
    let has_probe = s.summary_json.contains("from-the-test-inputs");
    match (hidden, has_probe) {
        (true, true) => Err(format!(
            "the team sees what its real submit {} reported: {}",
            s.name, s.summary_json
        )),
        (false, false) => Err(format!(
            "a host does not see what real submit {} reported: `{}`",
            s.name, s.summary_json
        )),
        _ => Ok(()),
    }
}

fn private_score(s: &Submission, visible: bool) -> Result<(), String> {
    match (visible, s.private_score) {
        (true, None) => Err(format!("private score of {} missing", s.id)),
        (false, Some(p)) => Err(format!("private score {p} of {} shown", s.id)),
        _ => Ok(()),
    }
}

fn upload_chunks(dataset: &str, archive: Vec<u8>) -> Vec<Vec<u8>> {
    vec![
        UploadCodeChunk {
            kind: Some(upload_code_chunk::Kind::Meta(UploadCodeMeta {
                dataset: dataset.into(),
            })),
        }
        .encode_to_vec(),
        UploadCodeChunk {
            kind: Some(upload_code_chunk::Kind::Data(archive)),
        }
        .encode_to_vec(),
    ]
}

/// A dataset registration whose archive is not an archive: refused as invalid once the caller may register.
fn register_chunks(name: &str, competition: &str) -> Vec<Vec<u8>> {
    vec![
        RegisterDatasetChunk {
            kind: Some(register_dataset_chunk::Kind::Meta(DatasetMeta {
                name: name.into(),
                competition: competition.into(),
                metric: "accuracy".into(),
                ..Default::default()
            })),
        }
        .encode_to_vec(),
        RegisterDatasetChunk {
            kind: Some(register_dataset_chunk::Kind::Data(
                b"not a gzip'd tar".to_vec(),
            )),
        }
        .encode_to_vec(),
    ]
}

/// Rows while the private leaderboard is hidden. Order matters where a call changes something: callers are
/// tried in [`Who::ALL`]'s order, refusals first.
fn before_reveal(w: &World) -> anyhow::Result<Vec<Row>> {
    use Who::*;
    let a = w.train.clone();
    let s = w.submit_session.clone();
    let t = w.trial_session.clone();
    let usernames = |who: Who, resp: &[Vec<u8>]| {
        let want = match who {
            OtherTeam => "bob",
            OtherHost => "ohost",
            Team => "alice",
            Host => "host",
            Admin => "admin",
            Anonymous => "",
        };
        let id = decode::<Identity>(resp)?;
        if id.username == want {
            Ok(())
        } else {
            Err(format!("answered for `{}`, not `{want}`", id.username))
        }
    };
    let code = tar_gz(&[("main.py", "print('hi')\n")])?;
    let mut rows = vec![
        // --- auth
        Row::new(
            "AuthService/Login",
            "alice's password",
            msg(LoginRequest {
                username: "alice".into(),
                password: "alice-pass".into(),
            }),
            [OK, OK, OK, OK, OK, OK],
        )
        .check(Anonymous, |r| {
            (decode::<LoginResponse>(r)?.username == "alice")
                .then_some(())
                .ok_or_else(|| "not alice's login".to_string())
        }),
        Row::new(
            "AuthService/WhoAmI",
            "",
            msg(Empty {}),
            [UNAUTH, OK, OK, OK, OK, OK],
        )
        .check_each(&[OtherTeam, OtherHost, Team, Host, Admin], usernames),
        Row::new(
            "AuthService/AddUser",
            "newbie into demo",
            msg(nsml_proto::v1::AddUserRequest {
                username: "newbie".into(),
                password: "newbie-pass".into(),
                team: "demo".into(),
                competition: "demo".into(),
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        // A host of one competition must not take over accounts beyond it.
        Row::new(
            "AuthService/AddUser",
            "reset admin's password",
            msg(nsml_proto::v1::AddUserRequest {
                username: "admin".into(),
                password: "taken-over".into(),
                team: "demo".into(),
                competition: "demo".into(),
            }),
            [UNAUTH, DENIED, DENIED, DENIED, DENIED, SKIP],
        ),
        Row::new(
            "AuthService/AddUser",
            "reset ohost's password",
            msg(nsml_proto::v1::AddUserRequest {
                username: "ohost".into(),
                password: "taken-over".into(),
                team: "demo".into(),
                competition: "demo".into(),
            }),
            [UNAUTH, DENIED, SKIP, DENIED, DENIED, SKIP],
        ),
        // A user already in another team is refused before anything about them changes.
        Row::new(
            "AuthService/AddUser",
            "bob into demo",
            msg(nsml_proto::v1::AddUserRequest {
                username: "bob".into(),
                password: "changed-pass".into(),
                team: "demo".into(),
                competition: "demo".into(),
            }),
            [SKIP, SKIP, SKIP, SKIP, FAILED, SKIP],
        ),
        Row::new(
            "AuthService/ApplyCompetition",
            "demo as it is",
            msg(ApplyCompetitionRequest {
                competition: Some(w.demo.clone()),
                users: vec![],
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        Row::new(
            "AuthService/ApplyCompetition",
            "a new competition",
            msg(ApplyCompetitionRequest {
                competition: Some(Competition {
                    id: "fresh".into(),
                    datasets: vec![DatasetRef {
                        name: "f1-cls".into(),
                        metric: "accuracy".into(),
                        direction: Direction::Descending as i32,
                    }],
                    ..Default::default()
                }),
                users: vec![],
            }),
            [UNAUTH, DENIED, DENIED, DENIED, DENIED, OK],
        ),
        Row::new(
            "AuthService/ListCompetitions",
            "",
            msg(Empty {}),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        Row::new(
            "AuthService/GetCompetition",
            "demo",
            msg(GetCompetitionRequest { id: "demo".into() }),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        // --- storage
        Row::new(
            "StorageService/RegisterDataset",
            "into demo (bad archive)",
            register_chunks("authz-ds", "demo"),
            [UNAUTH, DENIED, DENIED, DENIED, INVALID, INVALID],
        ),
        Row::new(
            "StorageService/RegisterDataset",
            "into other (bad archive)",
            register_chunks("authz-ods", "other"),
            [UNAUTH, DENIED, INVALID, DENIED, DENIED, INVALID],
        ),
        Row::new(
            "StorageService/ListDatasets",
            "",
            msg(ListDatasetsRequest::default()),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        Row::new(
            "StorageService/GetDataset",
            "t1-cls",
            msg(GetDatasetRequest {
                name: "t1-cls".into(),
            }),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        Row::new(
            "StorageService/UploadCode",
            "for t1-cls",
            upload_chunks("t1-cls", code.clone()),
            [UNAUTH, OK, DENIED, OK, DENIED, DENIED],
        ),
        Row::new(
            "StorageService/DownloadCode",
            "the team's snapshot",
            msg(DownloadCodeRequest {
                id: w.snapshot.clone(),
            }),
            [UNAUTH, DENIED, DENIED, OK, DENIED, OK],
        ),
        Row::new(
            "StorageService/FindCode",
            "the team's snapshot, for t1-cls",
            msg(FindCodeRequest {
                dataset: "t1-cls".into(),
                id: w.snapshot.clone(),
            }),
            // Another team of the competition learns nothing of the team's code: as if it did not exist.
            [UNAUTH, NOT_FOUND, DENIED, OK, DENIED, DENIED],
        ),
        Row::new(
            "StorageService/ListCheckpoints",
            &a,
            msg(ListCheckpointsRequest { session: a.clone() }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "StorageService/PullCheckpoint",
            &format!("{a} 0"),
            msg(PullCheckpointRequest {
                session: a.clone(),
                checkpoint: "0".into(),
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "StorageService/DeleteCheckpoint",
            &format!("{a} 0"),
            msg(DeleteCheckpointRequest {
                session: a.clone(),
                checkpoint: "0".into(),
            }),
            [UNAUTH, DENIED, DENIED, SKIP, SKIP, SKIP],
        ),
        Row::new(
            "StorageService/DeleteCheckpoint",
            &format!("{} *", w.spare[0]),
            msg(DeleteCheckpointRequest {
                session: w.spare[0].clone(),
                checkpoint: "*".into(),
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "StorageService/Usage",
            "team demo",
            msg(UsageRequest {
                team: "demo".into(),
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        // --- sessions
        // No snapshot: a caller who may run on the dataset gets past the rights check to INVALID_ARGUMENT.
        Row::new(
            "SessionService/Run",
            "t1-cls, no code",
            msg(RunRequest {
                dataset: "t1-cls".into(),
                ..Default::default()
            }),
            [UNAUTH, INVALID, DENIED, INVALID, DENIED, DENIED],
        ),
        Row::new(
            "SessionService/Run",
            "another team's code",
            msg(RunRequest {
                dataset: "t1-cls".into(),
                code_snapshot: w.snapshot.clone(),
                resources: Some(small()),
                ..Default::default()
            }),
            [SKIP, DENIED, SKIP, SKIP, SKIP, SKIP],
        ),
        // Named by a client that does not know whether its team uploaded it: unknown, as `FindCode` says.
        Row::new(
            "SessionService/Run",
            "another team's code, unconfirmed",
            msg(RunRequest {
                dataset: "t1-cls".into(),
                code_snapshot: w.snapshot.clone(),
                resources: Some(small()),
                code_unconfirmed: true,
                ..Default::default()
            }),
            [SKIP, NOT_FOUND, SKIP, SKIP, SKIP, SKIP],
        ),
        Row::new(
            "SessionService/List",
            "all",
            msg(ListSessionsRequest {
                all: true,
                ..Default::default()
            }),
            [UNAUTH, OK, OK, OK, OK, OK],
        )
        .check(OtherTeam, lists_teams(&["rivals"]))
        .check(OtherHost, lists_teams(&[]))
        .check(Team, lists_teams(&["demo"]))
        .check(Host, lists_teams(&["demo", "rivals"]))
        .check(Admin, lists_teams(&["demo", "rivals"]))
        .check_each(&[Team, Host], {
            let s = s.clone();
            move |who, resp| {
                let shown = sessions(resp)?;
                let sub = shown
                    .iter()
                    .find(|x| x.name == s)
                    .ok_or_else(|| format!("{s} not listed"))?;
                summary_of(sub, who == Team)
            }
        }),
        Row::new(
            "SessionService/Get",
            &a,
            msg(GetSessionRequest { name: a.clone() }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "SessionService/Get",
            &format!("{s} (real submit)"),
            msg(GetSessionRequest { name: s.clone() }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        )
        .check_each(&[Team, Host], |who, resp| {
            summary_of(&decode::<Session>(resp)?, who == Team)
        }),
        Row::new(
            "SessionService/Get",
            &w.rival_train,
            msg(GetSessionRequest {
                name: w.rival_train.clone(),
            }),
            [UNAUTH, OK, DENIED, DENIED, OK, OK],
        ),
        Row::new(
            "SessionService/Logs",
            &a,
            msg(LogsRequest {
                name: a.clone(),
                follow: false,
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        )
        .check(Team, |r| {
            (!r.is_empty())
                .then_some(())
                .ok_or_else(|| "no log lines".to_string())
        }),
        Row::new(
            "SessionService/Logs",
            &format!("{s} (real submit)"),
            msg(LogsRequest {
                name: s.clone(),
                follow: false,
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        Row::new(
            "SessionService/Logs",
            &format!("{t} (trial submit)"),
            msg(LogsRequest {
                name: t.clone(),
                follow: false,
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "SessionService/Metrics",
            &a,
            msg(MetricsRequest { name: a.clone() }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "SessionService/Metrics",
            &format!("{s} (real submit)"),
            msg(MetricsRequest { name: s.clone() }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        )
        .check(Host, |r| {
            let m = decode::<MetricsResponse>(r)?;
            m.points
                .iter()
                .any(|p| p.metrics_json.contains("from-the-test-inputs"))
                .then_some(())
                .ok_or_else(|| format!("the submit's report is missing: {m:?}"))
        }),
        Row::new(
            "SessionService/Stop",
            &format!("{a} (ended)"),
            msg(StopRequest { name: a.clone() }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "SessionService/Memo",
            &a,
            msg(MemoRequest {
                name: a.clone(),
                memo: "noted".into(),
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        // A pattern reaches only sessions the caller may see: none of the team's.
        Row::new(
            "SessionService/Remove",
            "demo/*",
            msg(RemoveRequest {
                pattern: "demo/*".into(),
                force: true,
            }),
            [UNAUTH, NOT_FOUND, NOT_FOUND, SKIP, SKIP, SKIP],
        ),
        // --- submissions
        Row::new(
            "SubmissionService/Submit",
            &format!("{a} 0 (trial)"),
            msg(SubmitRequest {
                session: a.clone(),
                checkpoint: "0".into(),
                trial: true,
            }),
            [UNAUTH, DENIED, DENIED, OK, DENIED, DENIED],
        ),
        Row::new(
            "SubmissionService/Get",
            "the team's real submit",
            msg(GetSubmissionRequest {
                id: w.submission.clone(),
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        )
        .check_each(&[Team, Host, Admin], |who, r| {
            private_score(&decode::<Submission>(r)?, who != Team)
        }),
        Row::new(
            "SubmissionService/List",
            "t1-cls",
            msg(ListSubmissionsRequest {
                dataset: "t1-cls".into(),
            }),
            [UNAUTH, OK, OK, OK, OK, OK],
        )
        .check_each(&[OtherTeam, OtherHost, Team, Host], {
            let id = w.submission.clone();
            move |who, r| {
                let subs = decode::<ListSubmissionsResponse>(r)?.submissions;
                if let Some(x) = subs.iter().find(|x| !matches!(x.team.as_str(), "demo")) {
                    return Err(format!("lists team {}'s submission {}", x.team, x.id));
                }
                let mine = subs.iter().find(|x| x.id == id);
                match (who, mine) {
                    (OtherTeam | OtherHost, None) => Ok(()),
                    (OtherTeam | OtherHost, Some(_)) => Err("lists the team's submission".into()),
                    (_, None) => Err(format!("submission {id} not listed")),
                    (_, Some(x)) => private_score(x, who == Host),
                }
            }
        }),
        // --- leaderboards
        Row::new(
            "LeaderboardService/Board",
            "t1-cls public",
            msg(BoardRequest {
                dataset: "t1-cls".into(),
                private: false,
            }),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        Row::new(
            "LeaderboardService/Board",
            "t1-cls private",
            msg(BoardRequest {
                dataset: "t1-cls".into(),
                private: true,
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        Row::new(
            "LeaderboardService/Overall",
            "demo public",
            msg(OverallRequest {
                competition: "demo".into(),
                private: false,
            }),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        Row::new(
            "LeaderboardService/Overall",
            "demo private",
            msg(OverallRequest {
                competition: "demo".into(),
                private: true,
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        Row::new(
            "LeaderboardService/History",
            "t1-cls",
            msg(HistoryRequest {
                dataset: "t1-cls".into(),
            }),
            [UNAUTH, OK, DENIED, OK, OK, OK],
        )
        .check_each(&[OtherTeam, Team, Host], |who, r| {
            let entries = decode::<HistoryResponse>(r)?.entries;
            let demo: Vec<_> = entries.iter().filter(|e| e.team == "demo").collect();
            match who {
                OtherTeam if demo.is_empty() => Ok(()),
                OtherTeam => Err("shows the team's submits".into()),
                _ if demo.is_empty() => Err("the team's submit is missing".into()),
                _ => match (who == Host, demo[0].private_score) {
                    (true, None) => Err("a host does not see the private score".into()),
                    (false, Some(_)) => Err("the private score is shown before the reveal".into()),
                    _ => Ok(()),
                },
            }
        }),
        // --- quota
        Row::new(
            "QuotaService/Usage",
            "team demo",
            msg(QuotaUsageRequest {
                team: "demo".into(),
                competition: "demo".into(),
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        ),
        Row::new(
            "QuotaService/GrantOverride",
            "extra submit for demo",
            msg(quota_requests::OverrideRequest {
                competition: "demo".into(),
                team: "demo".into(),
                kind: 1,
                dataset: "t1-cls".into(),
                reason: "access matrix".into(),
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        Row::new(
            "QuotaService/Replay",
            "demo",
            msg(quota_requests::ByCompetition {
                competition: "demo".into(),
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        Row::new(
            "QuotaService/Explain",
            &a,
            msg(quota_requests::ById { id: a.clone() }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
        // The log's integrity is every host's to check; it shows no competition's contents.
        Row::new(
            "QuotaService/Verify",
            "the whole log",
            msg(Empty {}),
            [UNAUTH, DENIED, OK, DENIED, OK, OK],
        ),
        Row::new(
            "QuotaService/Export",
            "team demo",
            msg(quota_requests::ByTeam {
                team: "demo".into(),
            }),
            [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
        ),
    ];
    // A submit of the other team's session, and the team's submit by another team's participant.
    rows.push(Row::new(
        "SubmissionService/Submit",
        &format!("{} 0 (trial)", w.rival_train),
        msg(SubmitRequest {
            session: w.rival_train.clone(),
            checkpoint: "0".into(),
            trial: true,
        }),
        [SKIP, SKIP, SKIP, DENIED, SKIP, SKIP],
    ));
    Ok(rows)
}

fn reveal() -> Vec<Row> {
    vec![Row::new(
        "AuthService/RevealPrivate",
        "demo",
        msg(RevealPrivateRequest {
            competition: "demo".into(),
        }),
        [UNAUTH, DENIED, DENIED, DENIED, OK, OK],
    )]
}

fn after_reveal(w: &World) -> Vec<Row> {
    use Who::*;
    vec![
        Row::new(
            "LeaderboardService/Board",
            "t1-cls private, revealed",
            msg(BoardRequest {
                dataset: "t1-cls".into(),
                private: true,
            }),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        Row::new(
            "LeaderboardService/Overall",
            "demo private, revealed",
            msg(OverallRequest {
                competition: "demo".into(),
                private: true,
            }),
            [UNAUTH, OK, OK, OK, OK, OK],
        ),
        Row::new(
            "SubmissionService/Get",
            "real submit, revealed",
            msg(GetSubmissionRequest {
                id: w.submission.clone(),
            }),
            [UNAUTH, DENIED, DENIED, OK, OK, OK],
        )
        .check_each(&[Team, Host], |_, r| {
            private_score(&decode::<Submission>(r)?, true)
        }),
    ]
}

/// Rows that take something away: each allowed caller removes a session of its own choosing.
fn destructive(w: &World) -> Vec<Row> {
    let rm = |name: &str| {
        msg(RemoveRequest {
            pattern: name.into(),
            force: false,
        })
    };
    vec![
        Row::new(
            "SessionService/Remove",
            &w.spare[0],
            rm(&w.spare[0]),
            [UNAUTH, DENIED, DENIED, OK, SKIP, SKIP],
        ),
        Row::new(
            "SessionService/Remove",
            &w.spare[1],
            rm(&w.spare[1]),
            [SKIP, SKIP, SKIP, SKIP, OK, SKIP],
        ),
        Row::new(
            "SessionService/Remove",
            &w.spare[2],
            rm(&w.spare[2]),
            [SKIP, SKIP, SKIP, SKIP, SKIP, OK],
        ),
        // A host may not take another competition's dataset by listing it in their own manifest.
        Row::new(
            "AuthService/ApplyCompetition",
            "other claims t1-cls",
            msg(ApplyCompetitionRequest {
                competition: Some(Competition {
                    id: "other".into(),
                    datasets: vec![
                        DatasetRef {
                            name: "o1-cls".into(),
                            metric: "accuracy".into(),
                            direction: Direction::Descending as i32,
                        },
                        DatasetRef {
                            name: "t1-cls".into(),
                            metric: "accuracy".into(),
                            direction: Direction::Descending as i32,
                        },
                    ],
                    hosts: vec!["ohost".into()],
                    ..Default::default()
                }),
                users: vec![],
            }),
            [SKIP, SKIP, ALREADY_EXISTS, SKIP, SKIP, ALREADY_EXISTS],
        ),
        Row::new(
            "AuthService/ApplyCompetition",
            "demo claims o1-cls",
            msg(ApplyCompetitionRequest {
                competition: Some(Competition {
                    datasets: w
                        .demo
                        .datasets
                        .iter()
                        .cloned()
                        .chain([DatasetRef {
                            name: "o1-cls".into(),
                            metric: "accuracy".into(),
                            direction: Direction::Descending as i32,
                        }])
                        .collect(),
                    ..w.demo.clone()
                }),
                users: vec![],
            }),
            [SKIP, SKIP, SKIP, SKIP, ALREADY_EXISTS, SKIP],
        ),
    ]
}

/// Every internal method through the gateway, as every caller: refused.
fn internal_rows() -> anyhow::Result<Vec<Row>> {
    let listed = gateway_internal_methods();
    ensure!(
        !listed.is_empty(),
        "no internal methods found in the gateway"
    );
    Ok(listed
        .iter()
        .map(|m| {
            Row::new(
                m,
                "internal",
                msg(Empty {}),
                [DENIED, DENIED, DENIED, DENIED, DENIED, DENIED],
            )
        })
        .collect())
}

/// The public API declares no internal method, the platform's internal calls are all in `nsml.internal.v1`,
/// and every public method is in the matrix.
fn check_coverage(matrix: &Matrix) -> anyhow::Result<()> {
    let declared = declared_methods(&repo_root().join("proto/nsml/v1"))?;
    let flagged: Vec<&String> = declared
        .iter()
        .filter(|(_, i)| *i)
        .map(|(m, _)| m)
        .collect();
    ensure!(
        flagged.is_empty(),
        "the public API declares methods documented as internal (they belong in proto/nsml/internal/v1): {flagged:?}"
    );
    let mut internal: Vec<String> = declared_methods(&repo_root().join("proto/nsml/internal/v1"))?
        .into_iter()
        .map(|(m, _)| format!("nsml.internal.v1.{m}"))
        .collect();
    internal.sort();
    let mut generated = gateway_internal_methods();
    generated.sort();
    ensure!(
        internal == generated,
        "proto/nsml/internal/v1 declares {internal:?}, the generated code knows {generated:?}"
    );
    let called = matrix.methods();
    let uncovered: Vec<&String> = declared
        .iter()
        .map(|(m, _)| m)
        .filter(|m| !called.contains(*m))
        .collect();
    ensure!(
        uncovered.is_empty(),
        "public methods without a row in the access matrix (add them to integration-tests/tests/authz.rs): {uncovered:?}"
    );
    Ok(())
}

/// Metadata a client sends under the platform's internal names is dropped at the gateway.
async fn forged_metadata(ch: &Channel, w: &World, matrix: &mut Matrix) -> anyhow::Result<()> {
    let admin = Identity {
        username: "admin".into(),
        admin: true,
        memberships: vec![Membership {
            team: "demo".into(),
            competition: "demo".into(),
        }],
        hosts: vec!["demo".into()],
    };
    let forge = |token: Option<&str>| {
        let mut md = nsml_integration_tests::access::bearer(token);
        md.insert_bin(
            "x-nsml-identity-bin",
            MetadataValue::from_bytes(&admin.encode_to_vec()),
        );
        md.insert("x-nsml-service", MetadataValue::from_static("submission"));
        md.insert("x-nsml-internal", MetadataValue::from_static("guessed"));
        md
    };
    let get_a = msg(GetSessionRequest {
        name: w.train.clone(),
    });
    // (method, what is forged, whose token, request, expected code)
    type Case = (&'static str, &'static str, Option<Who>, Vec<Vec<u8>>, Code);
    let cases: Vec<Case> = vec![
        (
            "AuthService/WhoAmI",
            "forged admin identity",
            None,
            msg(Empty {}),
            Code::Unauthenticated,
        ),
        (
            "SessionService/Get",
            "forged identity and service",
            None,
            get_a.clone(),
            Code::Unauthenticated,
        ),
        (
            "SessionService/Get",
            "forged identity and service",
            Some(Who::OtherTeam),
            get_a,
            Code::PermissionDenied,
        ),
        (
            "nsml.internal.v1.StorageInternal/FetchDatasetPart",
            "forged identity and service",
            Some(Who::Admin),
            msg(nsml_proto::internal::v1::FetchDatasetPartRequest {
                name: "t1-cls".into(),
                part: nsml_proto::v1::DatasetPart::TestLabel as i32,
            }),
            Code::PermissionDenied,
        ),
    ];
    for (rpc, what, who, body, expected) in cases {
        let token = who.and_then(|wh| w.callers.token(wh));
        let answer = call_raw(ch, &path_of(rpc), forge(token), body).await;
        matrix.record(
            rpc,
            what,
            vec![cell(who.unwrap_or(Who::Anonymous), expected, &answer)],
        );
    }
    // The other team's participant, claiming to be the administrator, is still themselves.
    let who = call_raw(
        ch,
        "/nsml.v1.AuthService/WhoAmI",
        forge(w.callers.token(Who::OtherTeam)),
        msg(Empty {}),
    )
    .await?;
    let id = Identity::decode(who.first().context("no answer")?.as_slice())?;
    ensure!(
        id.username == "bob" && !id.admin,
        "a forged identity was taken: {id:?}"
    );
    Ok(())
}

/// `Logout` ends the token it is called with, and only that one: each caller signs in twice, logs out with
/// the first token, which is refused from then on, while the second still works. Returns the tokens.
async fn logout_rows(ch: &Channel, matrix: &mut Matrix) -> anyhow::Result<Vec<String>> {
    let who_am_i = |token: &str| {
        call_raw(
            ch,
            "/nsml.v1.AuthService/WhoAmI",
            nsml_integration_tests::access::bearer(Some(token)),
            msg(Empty {}),
        )
    };
    let anonymous = call_raw(
        ch,
        "/nsml.v1.AuthService/Logout",
        nsml_integration_tests::access::bearer(None),
        msg(Empty {}),
    )
    .await;
    let mut cells = vec![cell(Who::Anonymous, Code::Unauthenticated, &anonymous)];
    let mut after = Vec::new();
    let mut tokens = Vec::new();
    for (who, user, password) in [
        (Who::OtherTeam, "bob", "bob-pass"),
        (Who::OtherHost, "ohost", "ohost-pass"),
        (Who::Team, "alice", "alice-pass"),
        (Who::Host, "host", "host-pass"),
    ] {
        // A password changed by a call that should have been refused shows here as a failed cell.
        let (ended, kept) = match (
            login(ch, user, password).await,
            login(ch, user, password).await,
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                let why = tonic::Status::unauthenticated(format!("{e:#}"));
                cells.push(cell(who, Code::Ok, &Err(why)));
                continue;
            }
        };
        let out = call_raw(
            ch,
            "/nsml.v1.AuthService/Logout",
            nsml_integration_tests::access::bearer(Some(&ended)),
            msg(Empty {}),
        )
        .await;
        cells.push(cell(who, Code::Ok, &out));
        after.push(cell(who, Code::Unauthenticated, &who_am_i(&ended).await));
        let kept_answer = who_am_i(&kept).await;
        ensure!(
            kept_answer.is_ok(),
            "logging out one token of {user} ended another: {kept_answer:?}"
        );
        tokens.extend([ended, kept]);
    }
    matrix.record("AuthService/Logout", "a fresh token", cells);
    matrix.record("AuthService/WhoAmI", "a logged-out token", after);
    Ok(tokens)
}

/// A change to who someone is applies from the very next call through the gateway, though the gateway keeps
/// the identity a token resolved to for a moment: bob's token, used just before, shows his new team at once.
async fn membership_applies_at_once(ch: &Channel, admin: &str) -> anyhow::Result<()> {
    let bob = login(ch, "bob", "bob-pass").await?;
    let who_am_i = |token: String| async move {
        anyhow::Ok(
            AuthServiceClient::new(ch.clone())
                .who_am_i(authed(Empty {}, &token)?)
                .await?
                .into_inner(),
        )
    };
    let in_other = |id: &Identity| {
        id.memberships
            .iter()
            .any(|m| m.competition == "other" && m.team == "o-team")
    };
    let before = who_am_i(bob.clone()).await?;
    ensure!(
        !in_other(&before),
        "bob is in the other competition already: {before:?}"
    );
    add_user(ch, admin, "bob", "bob-pass", ("other", "o-team"))
        .await
        .context("adding bob to a team of the other competition")?;
    let after = who_am_i(bob).await?;
    ensure!(
        in_other(&after),
        "the gateway still passed on bob's identity from before he joined a team: {after:?}"
    );
    Ok(())
}

/// Adds (or moves) `username` into `team` of `competition` through the gateway, as `token`.
async fn add_user(
    ch: &Channel,
    token: &str,
    username: &str,
    password: &str,
    (competition, team): (&str, &str),
) -> anyhow::Result<()> {
    AuthServiceClient::new(ch.clone())
        .add_user(authed(
            nsml_proto::v1::AddUserRequest {
                username: username.into(),
                password: password.into(),
                team: team.into(),
                competition: competition.into(),
            },
            token,
        )?)
        .await?;
    Ok(())
}

/// Five wrong passwords lock an account, even against the right password, and say when to retry; other
/// accounts are untouched.
async fn lockout(ch: &Channel, host_token: &str) -> anyhow::Result<()> {
    add_user(ch, host_token, "lockme", "right-pass", ("demo", "demo"))
        .await
        .context("adding a user to lock out")?;
    let try_login = |pw: &'static str| {
        let mut c = AuthServiceClient::new(ch.clone());
        async move {
            c.login(LoginRequest {
                username: "lockme".into(),
                password: pw.into(),
            })
            .await
        }
    };
    for i in 1..=5 {
        let err = try_login("wrong-pass")
            .await
            .err()
            .context("a wrong password was taken")?;
        ensure!(
            err.code() == Code::Unauthenticated,
            "wrong password {i}: {err:?}"
        );
    }
    let locked = try_login("right-pass")
        .await
        .err()
        .context("the right password logged in to a locked account")?;
    ensure!(
        locked.code() == Code::ResourceExhausted,
        "a locked account answered {locked:?}"
    );
    let secs: u64 = locked
        .message()
        .split("try again in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no retry time in `{}`", locked.message()))?;
    ensure!(
        (1..=60).contains(&secs),
        "retry in {secs} s: {}",
        locked.message()
    );
    login(ch, "alice", "alice-pass")
        .await
        .context("another account was locked too")?;
    Ok(())
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// No file of the data directory but the administrator's own token file holds a token; the log does hold
/// their hashes (so the search reads the right files).
fn tokens_not_in_files(data_dir: &Path, tokens: &[String]) -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut dirs = vec![data_dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n != "admin.token") {
                files.push(p);
            }
        }
    }
    let contents: Vec<(std::path::PathBuf, Vec<u8>)> = files
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    let holds = |needle: &str| {
        contents
            .iter()
            .filter(|(_, b)| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
    };
    ensure!(
        contents
            .iter()
            .any(|(p, _)| p.file_name().is_some_and(|n| n == "nsml.db")),
        "no nsml.db under {}",
        data_dir.display()
    );
    for t in tokens {
        let found = holds(t);
        ensure!(found.is_empty(), "a token is stored in clear in {found:?}");
        ensure!(
            !holds(&sha256_hex(t)).is_empty(),
            "the log does not hold a token's hash: is the search reading the log?"
        );
    }
    Ok(())
}

/// The Postgres log holds hashes of tokens only.
async fn tokens_not_in_postgres(url: &str, tokens: &[String]) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await?;
    for t in tokens {
        let count = |needle: String| {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM events WHERE position(convert_to($1, 'UTF8') in payload) > 0 \
                 OR strpos(metadata, $1) > 0 OR strpos(stream, $1) > 0",
            )
            .bind(needle)
        };
        let clear = count(t.clone()).fetch_one(&mut c).await?;
        ensure!(clear == 0, "a token is stored in clear in {clear} events");
        let hashed = count(sha256_hex(t)).fetch_one(&mut c).await?;
        ensure!(hashed > 0, "the log does not hold a token's hash");
    }
    Ok(())
}

/// The services' addresses and the internal secret, from a distributed deployment's config file.
fn service_addrs(config: &Path) -> anyhow::Result<(Vec<(String, String)>, String)> {
    let text = std::fs::read_to_string(config)?;
    let mut section = "";
    let mut addrs = Vec::new();
    let mut secret = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match (section, k.trim()) {
            ("[services]", k) => addrs.push((k.to_string(), v)),
            ("", "internal_secret") => secret = v,
            _ => {}
        }
    }
    ensure!(
        addrs.len() >= 6 && !secret.is_empty(),
        "no service addresses or secret in {}",
        config.display()
    );
    Ok((addrs, secret))
}

/// Every service, called at its own address past the gateway: without the deployment's secret, or with a
/// wrong one, refused whatever identity and service the call claims; with it, served as the service it
/// names (so the refusals are the secret's doing).
async fn direct_calls(dep: &Deployment, w: &World) -> anyhow::Result<()> {
    let config = dep.config_path().context("not a distributed deployment")?;
    let (addrs, secret) = service_addrs(config)?;
    let admin = Identity {
        username: "admin".into(),
        admin: true,
        ..Default::default()
    };
    // Without the secret, a call claims everything else: the administrator's identity and a service's name.
    let metadata = |secret: Option<&str>, claims: bool| {
        let mut md = tonic::metadata::MetadataMap::new();
        if claims {
            md.insert_bin(
                "x-nsml-identity-bin",
                MetadataValue::from_bytes(&admin.encode_to_vec()),
            );
        }
        md.insert("x-nsml-service", MetadataValue::from_static("gateway"));
        if let Some(s) = secret
            && let Ok(v) = MetadataValue::try_from(s)
        {
            md.insert("x-nsml-internal", v);
        }
        md
    };
    let mut matrix = Matrix::default();
    for (service, addr) in &addrs {
        let (rpc, body) = match service.as_str() {
            "auth" => (
                "nsml.internal.v1.AuthInternal/Authenticate",
                msg(nsml_proto::internal::v1::AuthenticateRequest {
                    token: w.tokens[0].clone(),
                }),
            ),
            "storage" => (
                "nsml.internal.v1.StorageInternal/FetchDatasetPart",
                msg(nsml_proto::internal::v1::FetchDatasetPartRequest {
                    name: "t1-cls".into(),
                    part: nsml_proto::v1::DatasetPart::Train as i32,
                }),
            ),
            "session" => (
                "SessionService/List",
                msg(ListSessionsRequest {
                    all: true,
                    ..Default::default()
                }),
            ),
            "quota" => (
                "QuotaService/Usage",
                msg(QuotaUsageRequest {
                    team: "demo".into(),
                    competition: "demo".into(),
                }),
            ),
            "submission" => (
                "SubmissionService/List",
                msg(ListSubmissionsRequest::default()),
            ),
            "leaderboard" => (
                "LeaderboardService/Board",
                msg(BoardRequest {
                    dataset: "t1-cls".into(),
                    private: true,
                }),
            ),
            other => anyhow::bail!("unknown service `{other}` in the config"),
        };
        let ch = channel(&format!("http://{addr}")).await?;
        let path = path_of(rpc);
        for (label, md, expected) in [
            ("no secret", metadata(None, true), Code::Unauthenticated),
            (
                "wrong secret",
                metadata(Some("not-the-secret"), true),
                Code::Unauthenticated,
            ),
            ("the secret", metadata(Some(&secret), false), Code::Ok),
        ] {
            let answer = call_raw(&ch, &path, md, body.clone()).await;
            matrix.record(
                &format!("{rpc} @{service}"),
                label,
                vec![cell(Who::Admin, expected, &answer)],
            );
        }
    }
    println!("{}", matrix.table());
    let failures = matrix.failures();
    ensure!(
        failures.is_empty(),
        "services answered calls that bypass the gateway:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// The whole matrix on a running deployment with the example competition; returns the world it built and
/// every token handed out.
async fn access_matrix(dep: &Deployment) -> anyhow::Result<(World, Vec<String>)> {
    let w = world(dep).await?;
    let ch = channel(&dep.url).await?;
    let mut m = Matrix::default();
    m.run(&ch, &w.callers, &with_live_views(before_reveal(&w)?))
        .await;
    m.run(&ch, &w.callers, &internal_rows()?).await;
    forged_metadata(&ch, &w, &mut m).await?;
    m.run(&ch, &w.callers, &reveal()).await;
    m.run(&ch, &w.callers, &with_live_views(after_reveal(&w)))
        .await;
    m.run(&ch, &w.callers, &destructive(&w)).await;
    let mut tokens = w.tokens.clone();
    tokens.extend(logout_rows(&ch, &mut m).await?);
    println!("{}", m.table());
    let failures = m.failures();
    ensure!(
        failures.is_empty(),
        "{} answers of the access matrix differ from the rules:\n{}\n\n{}",
        failures.len(),
        failures.join("\n"),
        m.table()
    );
    check_coverage(&m)?;
    // Refused calls changed nothing: bob and ohost keep their passwords, bob runs nothing of the team's.
    login(&ch, "bob", "bob-pass").await?;
    login(&ch, "ohost", "ohost-pass").await?;
    let bobs = call_raw(
        &ch,
        "/nsml.v1.SessionService/List",
        nsml_integration_tests::access::bearer(w.callers.token(Who::OtherTeam)),
        msg(ListSessionsRequest {
            all: true,
            ..Default::default()
        }),
    )
    .await?;
    let bobs = sessions(&bobs).map_err(anyhow::Error::msg)?;
    ensure!(
        bobs.iter().all(|s| s.code_snapshot != w.snapshot),
        "the other team runs the team's code: {bobs:?}"
    );
    Ok((w, tokens))
}

#[test]
fn embedded_access_matrix_and_logins() -> anyhow::Result<()> {
    let dep = Deployment::embedded()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (w, tokens) = access_matrix(&dep).await?;
        let ch = channel(&dep.url).await?;
        let host = w.callers.token(Who::Host).context("no host token")?;
        lockout(&ch, host).await?;
        membership_applies_at_once(&ch, w.callers.token(Who::Admin).context("no admin token")?)
            .await?;
        tokens_not_in_files(&dep.data_dir, &tokens)
    })
}

#[test]
fn distributed_access_matrix_and_direct_calls() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let result = (|| {
        let dep = Deployment::distributed(&db.url, &stream)?;
        // The gateway answers before every service behind it does: retry while one is unavailable.
        let host = dep.host()?;
        nsml_integration_tests::eventually(Duration::from_secs(30), || {
            let out = host.nsml(&["admin", "competition", "apply", "examples/competition.toml"])?;
            if out.code == 0 {
                Ok(Some(()))
            } else if out.stderr.contains("unavailable") {
                Ok(None)
            } else {
                out.ok().map(|_| None)
            }
        })?;
        rt.block_on(async {
            let (w, tokens) = access_matrix(&dep).await?;
            direct_calls(&dep, &w).await?;
            tokens_not_in_postgres(&db.url, &tokens).await
        })
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}
