//! The leaderboard served for real: a fresh SQLite log per test, the in-process bus and its relay, the service on
//! 127.0.0.1:0 behind the internal guard, and events appended straight to the store as the other services would.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::ServiceContext;
use nsml_common::caller::{Caller, INTERNAL_SECRET_KEY};
use nsml_common::event::new_event;
use nsml_common::server::{random_secret, serve};
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore};
use nsml_proto::v1::leaderboard_service_client::LeaderboardServiceClient;
use nsml_proto::v1::{
    BoardRequest, BoardResponse, Competition, CompetitionApplied, DatasetRef, Direction,
    EventPayload, HistoryRequest, Identity, Membership, OverallRequest, PrivateRevealed,
    Submission, SubmissionScored, SubmissionStatus, Team,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

struct Harness {
    client: LeaderboardServiceClient<Channel>,
    store: Arc<dyn EventStore>,
    secret: String,
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
        let ctx = ServiceContext {
            store: store.clone(),
            bus,
            addrs: Default::default(),
            secret: secret.clone().into(),
            data_dir: dir.path().join("leaderboard"),
            cancel: cancel.clone(),
            executor: None,
        };
        let started = nsml_leaderboard::start(ctx).await.expect("start");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (routes, names) = (
            (started.routes)(tonic::service::Routes::default()),
            started.names,
        );
        let serve_secret: Arc<str> = secret.clone().into();
        let serve_cancel = cancel.clone();
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
            client: LeaderboardServiceClient::new(channel),
            store,
            secret,
            cancel,
            _dir: dir,
        }
    }

    async fn append<P: EventPayload>(&self, stream: &str, payload: &P) {
        self.store
            .append(
                stream,
                ExpectedVersion::Any,
                vec![new_event(payload, "test", "")],
            )
            .await
            .expect("append");
    }

    /// A request as the gateway sends it for a signed-in user (or for nobody, with `None`).
    fn request<T>(&self, msg: T, who: Option<&Identity>) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(
            INTERNAL_SECRET_KEY,
            self.secret.parse().expect("ascii secret"),
        );
        if let Some(id) = who {
            Caller::attach_identity(req.metadata_mut(), id);
        }
        req
    }

    async fn board(
        &self,
        dataset: &str,
        private: bool,
        who: &Identity,
    ) -> Result<BoardResponse, tonic::Status> {
        let req = self.request(
            BoardRequest {
                dataset: dataset.into(),
                private,
            },
            Some(who),
        );
        self.client.clone().board(req).await.map(|r| r.into_inner())
    }

    /// Seeds the `demo` competition: datasets `t1-cls` (accuracy) and `t2-asr` (CER), teams ants, bees and
    /// cats, host hal.
    async fn seed_competition(&self) {
        let competition = Competition {
            id: "demo".into(),
            title: "Demo".into(),
            datasets: vec![
                DatasetRef {
                    name: "t1-cls".into(),
                    metric: "accuracy".into(),
                    direction: Direction::Descending as i32,
                },
                DatasetRef {
                    name: "t2-asr".into(),
                    metric: "cer".into(),
                    direction: Direction::Ascending as i32,
                },
            ],
            teams: ["ants", "bees", "cats"]
                .iter()
                .map(|t| Team {
                    name: t.to_string(),
                    members: vec![],
                })
                .collect(),
            hosts: vec!["hal".into()],
            ..Default::default()
        };
        self.append(
            "competition-demo",
            &CompetitionApplied {
                competition: Some(competition),
            },
        )
        .await;
    }

    async fn scored(&self, s: Scored<'_>) {
        let submission = Submission {
            id: s.id.into(),
            team: s.team.into(),
            dataset: s.dataset.into(),
            competition: "demo".into(),
            source_session: format!("{}/{}/{}", s.team, s.dataset, s.session),
            checkpoint: s.checkpoint.into(),
            trial: s.trial,
            session: format!("{}/{}/{}", s.team, s.dataset, s.session + 100),
            status: SubmissionStatus::Scored as i32,
            score: s.score,
            private_score: Some(s.private),
            submitted_at_ms: s.at,
            finished_at_ms: s.at + 60_000,
            metric: String::new(),
            ..Default::default()
        };
        self.append(
            &format!("submission-{}", s.id),
            &SubmissionScored {
                submission: Some(submission),
            },
        )
        .await;
    }
}

struct Scored<'a> {
    id: &'a str,
    team: &'a str,
    dataset: &'a str,
    session: u64,
    checkpoint: &'a str,
    score: f64,
    private: f64,
    at: i64,
    trial: bool,
}

fn real<'a>(
    id: &'a str,
    team: &'a str,
    dataset: &'a str,
    score: f64,
    private: f64,
    at: i64,
) -> Scored<'a> {
    Scored {
        id,
        team,
        dataset,
        session: 1,
        checkpoint: "best",
        score,
        private,
        at,
        trial: false,
    }
}

fn participant(name: &str, team: &str) -> Identity {
    Identity {
        username: name.into(),
        admin: false,
        memberships: vec![Membership {
            team: team.into(),
            competition: "demo".into(),
        }],
        hosts: vec![],
    }
}

fn host() -> Identity {
    Identity {
        username: "hal".into(),
        admin: false,
        memberships: vec![],
        hosts: vec!["demo".into()],
    }
}

/// Polls `f` until it yields `Some` (the projection follows the log asynchronously), for at most five seconds.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..250 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Seeds the competition and these submits on `t1-cls` (accuracy, higher is better):
/// ants 0.70 then 0.90 (private 0.60, 0.65), bees 0.80 (private 0.85), a trial of cats at 0.99;
/// and on `t2-asr` (CER, lower is better): bees 0.20, cats 0.10 then 0.30.
async fn seeded() -> Harness {
    let h = Harness::start().await;
    h.seed_competition().await;
    h.scored(real("s1", "ants", "t1-cls", 0.70, 0.60, 1_000))
        .await;
    h.scored(Scored {
        session: 2,
        checkpoint: "ep9",
        ..real("s2", "ants", "t1-cls", 0.90, 0.65, 2_000)
    })
    .await;
    h.scored(real("s3", "bees", "t1-cls", 0.80, 0.85, 1_500))
        .await;
    h.scored(Scored {
        trial: true,
        ..real("t1", "cats", "t1-cls", 0.99, 0.99, 1_700)
    })
    .await;
    h.scored(real("s4", "bees", "t2-asr", 0.20, 0.25, 3_000))
        .await;
    h.scored(real("s5", "cats", "t2-asr", 0.10, 0.30, 3_100))
        .await;
    h.scored(real("s6", "cats", "t2-asr", 0.30, 0.05, 3_200))
        .await;
    let ann = participant("ann", "ants");
    let (hr, ann) = (&h, &ann);
    eventually("every submit on the boards", move || async move {
        let t2 = hr.board("t2-asr", false, ann).await.ok()?;
        let n: u32 = t2.rows.iter().map(|r| r.count).sum();
        (n == 3).then_some(())
    })
    .await;
    h
}

#[tokio::test]
async fn the_public_board_ranks_each_teams_best_real_submit() {
    let h = seeded().await;
    let ann = participant("ann", "ants");

    let board = h.board("t1-cls", false, &ann).await.expect("board");
    assert_eq!(board.competition, "demo");
    assert_eq!(board.metric, "accuracy");
    assert_eq!(board.direction, Direction::Descending as i32);
    let rows: Vec<_> = board
        .rows
        .iter()
        .map(|r| (r.rank, r.team.as_str(), r.score, r.model.as_str(), r.count))
        .collect();
    assert_eq!(
        rows,
        [
            (1, "ants", 0.90, "ants/t1-cls/2/ep9", 2),
            (2, "bees", 0.80, "bees/t1-cls/1/best", 1),
        ],
        "cats' trial submit is not on the board"
    );
    assert_eq!(board.rows[0].last_submit_ms, 2_000);
    assert_eq!(board.rows[0].best_at_ms, 62_000);

    let asr = h.board("t2-asr", false, &ann).await.expect("board");
    let rows: Vec<_> = asr
        .rows
        .iter()
        .map(|r| (r.team.as_str(), r.score, r.count))
        .collect();
    assert_eq!(
        rows,
        [("cats", 0.10, 2), ("bees", 0.20, 1)],
        "lower CER ranks first"
    );
}

#[tokio::test]
async fn the_private_board_is_for_hosts_until_revealed() {
    let h = seeded().await;
    let ann = participant("ann", "ants");

    let err = h.board("t1-cls", true, &ann).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "the private leaderboard of `demo` is hidden until the host reveals it"
    );

    let board = h
        .board("t1-cls", true, &host())
        .await
        .expect("host sees it");
    assert!(board.private);
    let rows: Vec<_> = board
        .rows
        .iter()
        .map(|r| (r.team.as_str(), r.score))
        .collect();
    assert_eq!(
        rows,
        [("bees", 0.85), ("ants", 0.65)],
        "ranked by private score"
    );

    h.append(
        "competition-demo",
        &PrivateRevealed {
            competition: "demo".into(),
        },
    )
    .await;
    let (hr, ann) = (&h, &ann);
    let board = eventually("the reveal", move || async move {
        hr.board("t1-cls", true, ann).await.ok()
    })
    .await;
    assert_eq!(board.rows[0].team, "bees");
}

#[tokio::test]
async fn the_overall_ranking_puts_a_team_missing_a_dataset_last_there() {
    let h = seeded().await;
    let ann = participant("ann", "ants");
    // Named, and chosen from the caller's only competition.
    for competition in ["demo", ""] {
        let req = h.request(
            OverallRequest {
                competition: competition.into(),
                private: false,
            },
            Some(&ann),
        );
        let overall = h
            .client
            .clone()
            .overall(req)
            .await
            .expect("overall")
            .into_inner();
        assert_eq!(overall.competition, "demo");
        assert_eq!(overall.datasets, ["t1-cls", "t2-asr"]);
        let rows: Vec<_> = overall
            .rows
            .iter()
            .map(|r| (r.rank, r.team.as_str(), r.mean_rank, r.ranks.clone()))
            .collect();
        // t1-cls: ants 1, bees 2, cats absent (3). t2-asr: cats 1, bees 2, ants absent (3).
        // ants 2.0, bees 2.0, cats 2.0: all tie on the mean; ants and cats have a first place and win over bees,
        // then the name decides between them.
        assert_eq!(
            rows,
            [
                (1, "ants", 2.0, vec![1, 3]),
                (2, "cats", 2.0, vec![3, 1]),
                (3, "bees", 2.0, vec![2, 2]),
            ]
        );
    }

    let req = h.request(
        OverallRequest {
            competition: "nope".into(),
            private: false,
        },
        Some(&ann),
    );
    let err = h.client.clone().overall(req).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "competition `nope` not found");

    let two = Identity {
        memberships: vec![
            Membership {
                team: "ants".into(),
                competition: "demo".into(),
            },
            Membership {
                team: "ants".into(),
                competition: "other".into(),
            },
        ],
        ..participant("amy", "ants")
    };
    let req = h.request(OverallRequest::default(), Some(&two));
    let err = h.client.clone().overall(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "name the competition: you are in `demo`, `other`"
    );

    let req = h.request(
        OverallRequest {
            competition: "demo".into(),
            private: true,
        },
        Some(&ann),
    );
    let err = h.client.clone().overall(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// `Board` and `Overall` are answered from encodings kept per dataset or competition and side: a new score
/// changes them, and the private ones, kept once a host has read them, are still refused to a participant.
#[tokio::test]
async fn the_kept_answers_follow_new_scores_and_keep_the_private_ones_hidden() {
    let h = seeded().await;
    let ann = participant("ann", "ants");
    let board_before = h.board("t2-asr", false, &ann).await.expect("board");
    assert_eq!(board_before.rows[0].team, "cats");
    h.board("t2-asr", true, &host())
        .await
        .expect("the host's private board");
    let err = h.board("t2-asr", true, &ann).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let overall = |who: &Identity, private: bool| {
        let req = h.request(
            OverallRequest {
                competition: "demo".into(),
                private,
            },
            Some(who),
        );
        let mut client = h.client.clone();
        async move { client.overall(req).await.map(|r| r.into_inner()) }
    };
    let ranks = |o: &nsml_proto::v1::OverallResponse| -> Vec<(String, Vec<u32>)> {
        o.rows
            .iter()
            .map(|r| (r.team.clone(), r.ranks.clone()))
            .collect()
    };
    let before = overall(&ann, false).await.expect("overall");
    assert_eq!(before, overall(&ann, false).await.expect("again"), "kept");
    assert_eq!(ranks(&before)[0], ("ants".to_string(), vec![1, 3]));

    // The host reads the private ranking, which is then kept; a participant is still refused it.
    let private = overall(&host(), true).await.expect("the host's private");
    assert!(private.private);
    let err = overall(&ann, true).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // ants go first on t2-asr too: the next answer shows it.
    h.scored(real("s7", "ants", "t2-asr", 0.01, 0.01, 4_000))
        .await;
    let (ann_ref, overall_ref) = (&ann, &overall);
    let after = eventually("the new score in the overall ranking", move || async move {
        let o = overall_ref(ann_ref, false).await.ok()?;
        (o.rows[0].ranks == [1, 1]).then_some(o)
    })
    .await;
    assert_eq!(after.rows[0].team, "ants");
    assert_ne!(ranks(&after), ranks(&before));
    let board = h.board("t2-asr", false, &ann).await.expect("board");
    assert_eq!(board.rows[0].team, "ants", "{board:?}");
    assert_eq!(board.rows.len(), board_before.rows.len() + 1);
    let private = overall(&host(), true).await.expect("the host's private");
    assert_eq!(
        private.rows[0].ranks,
        [2, 1],
        "ants on the private side: 0.65 < 0.85, 0.01 first"
    );
}

#[tokio::test]
async fn history_shows_a_participant_their_own_team_and_a_host_every_team() {
    let h = seeded().await;
    let ann = participant("ann", "ants");

    let req = h.request(HistoryRequest::default(), Some(&ann));
    let entries = h
        .client
        .clone()
        .history(req)
        .await
        .expect("history")
        .into_inner()
        .entries;
    let seen: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.submission_id.as_str(),
                e.team.as_str(),
                e.score,
                e.private_score,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("s2", "ants", 0.90, None), ("s1", "ants", 0.70, None)],
        "newest first, own team only, no private score before the reveal"
    );
    assert_eq!(entries[0].model, "ants/t1-cls/2/ep9");
    assert_eq!(entries[0].at_ms, 2_000);

    let req = h.request(
        HistoryRequest {
            dataset: "t2-asr".into(),
        },
        Some(&host()),
    );
    let entries = h
        .client
        .clone()
        .history(req)
        .await
        .expect("history")
        .into_inner()
        .entries;
    let seen: Vec<_> = entries
        .iter()
        .map(|e| (e.submission_id.as_str(), e.team.as_str(), e.private_score))
        .collect();
    assert_eq!(
        seen,
        [
            ("s6", "cats", Some(0.05)),
            ("s5", "cats", Some(0.30)),
            ("s4", "bees", Some(0.25))
        ]
    );

    let outsider = Identity {
        username: "zed".into(),
        ..Default::default()
    };
    let req = h.request(
        HistoryRequest {
            dataset: "t1-cls".into(),
        },
        Some(&outsider),
    );
    let err = h.client.clone().history(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "you are not in a team of competition `demo`");
}

#[tokio::test]
async fn calls_need_a_signed_in_caller_and_a_known_dataset() {
    let h = seeded().await;
    let req = h.request(
        BoardRequest {
            dataset: "t1-cls".into(),
            private: false,
        },
        None,
    );
    let err = h.client.clone().board(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().starts_with("not logged in: run `nsml login`"),
        "{}",
        err.message()
    );

    let err = h
        .board("t9-nope", false, &participant("ann", "ants"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "dataset `t9-nope` not found; `nsml dataset ls` lists them"
    );

    // Without the internal secret the service refuses outright.
    let mut req = Request::new(BoardRequest {
        dataset: "t1-cls".into(),
        private: false,
    });
    Caller::attach_identity(req.metadata_mut(), &host());
    let err = h.client.clone().board(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_boards_are_rebuilt_from_the_log_at_boot() {
    // Events appended before the service starts are on the boards once it has caught up.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.db");
    {
        let store = SqliteStore::open(&path).await.expect("open");
        let ev = new_event(
            &SubmissionScored {
                submission: Some(Submission {
                    id: "old".into(),
                    team: "ants".into(),
                    dataset: "t1-cls".into(),
                    competition: "demo".into(),
                    source_session: "ants/t1-cls/1".into(),
                    checkpoint: "0".into(),
                    score: 0.5,
                    submitted_at_ms: 10,
                    metric: "accuracy".into(),
                    ..Default::default()
                }),
            },
            "test",
            "",
        );
        store
            .append("submission-old", ExpectedVersion::NoStream, vec![ev])
            .await
            .expect("append");
        store.close().await;
    }
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&path).await.expect("reopen"));
    let cancel = CancellationToken::new();
    let ctx = ServiceContext {
        store,
        bus: nsml_bus::InProcessBus::new(),
        addrs: Default::default(),
        secret: "s3cret".into(),
        data_dir: dir.path().join("leaderboard"),
        cancel: cancel.clone(),
        executor: None,
    };
    let started = nsml_leaderboard::start(ctx).await.expect("start");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let secret: Arc<str> = "s3cret".into();
    let (routes, names) = (
        (started.routes)(tonic::service::Routes::default()),
        started.names,
    );
    let serve_cancel = cancel.clone();
    let serve_secret = secret.clone();
    tokio::spawn(async move {
        serve(listener, routes, &names, serve_secret, serve_cancel)
            .await
            .expect("serve");
    });
    let mut client = LeaderboardServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let mut req = Request::new(BoardRequest {
        dataset: "t1-cls".into(),
        private: false,
    });
    req.metadata_mut()
        .insert(INTERNAL_SECRET_KEY, "s3cret".parse().expect("ascii"));
    Caller::attach_identity(req.metadata_mut(), &participant("ann", "ants"));
    // The call waits for the catch-up itself: no polling needed.
    let board = client.board(req).await.expect("board").into_inner();
    assert_eq!(board.rows.len(), 1);
    assert_eq!(board.rows[0].model, "ants/t1-cls/1/0");
    cancel.cancel();
}
