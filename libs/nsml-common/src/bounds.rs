//! The documented maxima of every size and count field at the public API's boundary, and their check.
//!
//! Whatever a client sends may end up in the append-only log, in another team's `nsml ps` or in an error
//! message, so every public request is measured before anything reads it further: each public RPC handler
//! starts with [`check`], which refuses an oversized field with INVALID_ARGUMENT naming the field, its size
//! and the limit (`memo is 8388608 bytes; the limit is 1024 bytes`). Byte streams (datasets, code,
//! checkpoints) are capped by storage itself; the numeric resources a session asks for are checked by the
//! session service against its policy.
//!
//! Error messages that quote what a client sent quote it through [`shown`], which shortens a long value.

use crate::error::ErrorCode;
use std::borrow::Cow;

use nsml_proto::internal::v1::{AuthenticateRequest, FetchDatasetPartRequest};
use nsml_proto::internal::v1::{CheckpointMeta, RunnerReportRequest};
use nsml_proto::v1::MetricPoint;
use nsml_proto::v1::{
    AddUserRequest, ApplyCompetitionRequest, BoardRequest, Competition, DatasetMeta,
    DeleteCheckpointRequest, DownloadCodeRequest, Empty, ExplainRequest, ExportRequest,
    FindCodeRequest, GetCompetitionRequest, GetDatasetRequest, GetSessionRequest,
    GetSubmissionRequest, HistoryRequest, ListCheckpointsRequest, ListDatasetsRequest,
    ListSessionsRequest, ListSubmissionsRequest, LoginRequest, LogsRequest, MemoRequest,
    MetricsRequest, OverallRequest, OverrideRequest, PullCheckpointRequest, QuotaUsageRequest,
    RemoveRequest, ReplayRequest, RevealPrivateRequest, RunRequest, StopRequest, SubmitRequest,
    UploadCodeMeta, UsageRequest, VerifyRequest,
};
use tonic::{Request, Status};

/// The longest user name, in bytes: user names are identifiers (see [`crate::names::check_ident`]).
pub const MAX_USERNAME_BYTES: usize = 63;
/// The longest name of anything else a request refers to (team, dataset, competition, session
/// `TEAM/DATASET/N`, checkpoint, snapshot, submission or decision id), in bytes. Each kind's own rule is
/// stricter; this bound is what is measured before any of them runs.
pub const MAX_NAME_BYTES: usize = 256;
/// The longest password, in bytes: enough for any passphrase, short enough that hashing it costs nothing
/// more than hashing a short one.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The longest bearer token, in bytes (the platform's are 64 hex digits).
pub const MAX_TOKEN_BYTES: usize = 256;
/// The longest session memo, in bytes.
pub const MAX_MEMO_BYTES: usize = 1024;
/// The longest entry file path of a session, in bytes.
pub const MAX_ENTRY_BYTES: usize = 1024;
/// The longest argument string of a session, in bytes.
pub const MAX_ARGS_BYTES: usize = 8 * 1024;
/// The longest pattern (`nsml rm`) or search text (`nsml ps --search`), in bytes.
pub const MAX_PATTERN_BYTES: usize = 256;
/// The longest free text a host writes (a competition's title, an override's reason, a metric's name), in
/// bytes.
pub const MAX_TEXT_BYTES: usize = 1024;
/// The longest dataset description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 16 * 1024;
/// The most entries of any list in a request (users, teams, members, hosts, datasets, private keys).
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// The largest metrics of one `nsml.report` call, as JSON, in bytes. A checkpoint's summary is the last
/// summary reported, so it has the same bound. Participant code reaches this through the SDK: every report
/// is an event in the log.
pub const MAX_METRICS_BYTES: usize = 64 * 1024;
/// How much of a client's value an error message quotes before shortening it, in characters.
pub const SHOWN_CHARS: usize = 64;

/// A request whose size and count fields have documented maxima.
pub trait Bounded {
    /// Refuses the first field over its maximum with INVALID_ARGUMENT naming the field, its size and the
    /// limit.
    fn check_bounds(&self) -> Result<(), Status>;
}

/// Checks a request's fields against their maxima: the first line of every public RPC handler.
pub fn check<T: Bounded>(req: &Request<T>) -> Result<(), Status> {
    req.get_ref().check_bounds()
}

/// Refuses `value` if it is longer than `max` bytes.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(ErrorCode::TooLarge.status(format!(
            "{field} is {} bytes; the limit is {max} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// Refuses a list of `len` entries if it has more than `max`.
pub fn entries(field: &str, len: usize, max: usize) -> Result<(), Status> {
    if len > max {
        return Err(ErrorCode::TooLarge.status(format!(
            "{field} has {len} entries; the limit is {max} entries"
        )));
    }
    Ok(())
}

/// Refuses a list longer than [`MAX_LIST_ENTRIES`] or any of its strings longer than `max` bytes.
pub fn texts(field: &str, values: &[String], max: usize) -> Result<(), Status> {
    entries(field, values.len(), MAX_LIST_ENTRIES)?;
    values.iter().try_for_each(|v| text(field, v, max))
}

/// A client's value as an error message quotes it: whole if short, otherwise its first [`SHOWN_CHARS`]
/// characters and its length (`abc… (1048576 bytes)`). Control characters are escaped, so a quoted value
/// can neither break a header nor drive a terminal.
pub fn shown(value: &str) -> Cow<'_, str> {
    let short = value.chars().count() <= SHOWN_CHARS;
    if short && !value.chars().any(char::is_control) {
        return Cow::Borrowed(value);
    }
    let mut out = String::new();
    for c in value.chars().take(SHOWN_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if !short {
        out.push_str(&format!("… ({} bytes)", value.len()));
    }
    Cow::Owned(out)
}

/// Implements [`Bounded`] for a message from its string fields and their maxima.
macro_rules! bounded {
    ($($ty:ty { $($field:ident: $max:expr),* $(,)? })*) => {
        $(impl Bounded for $ty {
            fn check_bounds(&self) -> Result<(), Status> {
                $(text(stringify!($field), &self.$field, $max)?;)*
                Ok(())
            }
        })*
    };
}

bounded! {
    Empty {}
    VerifyRequest {}
    LoginRequest { username: MAX_USERNAME_BYTES, password: MAX_PASSWORD_BYTES }
    AddUserRequest {
        username: MAX_USERNAME_BYTES,
        password: MAX_PASSWORD_BYTES,
        team: MAX_NAME_BYTES,
        competition: MAX_NAME_BYTES,
    }
    GetCompetitionRequest { id: MAX_NAME_BYTES }
    RevealPrivateRequest { competition: MAX_NAME_BYTES }
    AuthenticateRequest { token: MAX_TOKEN_BYTES }
    ListDatasetsRequest { competition: MAX_NAME_BYTES }
    GetDatasetRequest { name: MAX_NAME_BYTES }
    FetchDatasetPartRequest { name: MAX_NAME_BYTES }
    UploadCodeMeta { dataset: MAX_NAME_BYTES }
    DownloadCodeRequest { id: MAX_NAME_BYTES }
    FindCodeRequest { dataset: MAX_NAME_BYTES, id: MAX_NAME_BYTES }
    ListCheckpointsRequest { session: MAX_NAME_BYTES }
    PullCheckpointRequest { session: MAX_NAME_BYTES, checkpoint: MAX_NAME_BYTES }
    DeleteCheckpointRequest { session: MAX_NAME_BYTES, checkpoint: MAX_PATTERN_BYTES }
    UsageRequest { team: MAX_NAME_BYTES }
    RunRequest {
        dataset: MAX_NAME_BYTES,
        entry: MAX_ENTRY_BYTES,
        args: MAX_ARGS_BYTES,
        memo: MAX_MEMO_BYTES,
        code_snapshot: MAX_NAME_BYTES,
        environment: MAX_NAME_BYTES,
    }
    ListSessionsRequest { dataset: MAX_NAME_BYTES, search: MAX_PATTERN_BYTES }
    GetSessionRequest { name: MAX_NAME_BYTES }
    LogsRequest { name: MAX_NAME_BYTES }
    StopRequest { name: MAX_NAME_BYTES }
    RemoveRequest { pattern: MAX_PATTERN_BYTES }
    MemoRequest { name: MAX_NAME_BYTES, memo: MAX_MEMO_BYTES }
    MetricsRequest { name: MAX_NAME_BYTES }
    QuotaUsageRequest { team: MAX_NAME_BYTES, competition: MAX_NAME_BYTES }
    OverrideRequest {
        competition: MAX_NAME_BYTES,
        team: MAX_NAME_BYTES,
        dataset: MAX_NAME_BYTES,
        submission_id: MAX_NAME_BYTES,
        reason: MAX_TEXT_BYTES,
        command_id: MAX_NAME_BYTES,
        round: MAX_NAME_BYTES,
    }
    ReplayRequest { competition: MAX_NAME_BYTES, team: MAX_NAME_BYTES }
    ExplainRequest { id: MAX_NAME_BYTES }
    ExportRequest { team: MAX_NAME_BYTES }
    SubmitRequest { session: MAX_NAME_BYTES, checkpoint: MAX_NAME_BYTES }
    GetSubmissionRequest { id: MAX_NAME_BYTES }
    ListSubmissionsRequest { dataset: MAX_NAME_BYTES }
    BoardRequest { dataset: MAX_NAME_BYTES }
    OverallRequest { competition: MAX_NAME_BYTES }
    HistoryRequest { dataset: MAX_NAME_BYTES }
    MetricPoint { scope: MAX_TEXT_BYTES, metrics_json: MAX_METRICS_BYTES }
    CheckpointMeta {
        session: MAX_NAME_BYTES,
        checkpoint: MAX_NAME_BYTES,
        summary_json: MAX_METRICS_BYTES,
    }
}

/// What the runner reports for participant code's `nsml.report`.
impl Bounded for RunnerReportRequest {
    fn check_bounds(&self) -> Result<(), Status> {
        text("name", &self.name, MAX_NAME_BYTES)?;
        self.point.as_ref().map_or(Ok(()), Bounded::check_bounds)
    }
}

impl Bounded for DatasetMeta {
    fn check_bounds(&self) -> Result<(), Status> {
        text("name", &self.name, MAX_NAME_BYTES)?;
        text("competition", &self.competition, MAX_NAME_BYTES)?;
        text("description", &self.description, MAX_DESCRIPTION_BYTES)?;
        text("metric", &self.metric, MAX_TEXT_BYTES)?;
        texts("private_keys", &self.private_keys, MAX_NAME_BYTES)?;
        text("eval_script", &self.eval_script, MAX_NAME_BYTES)?;
        text("tag", &self.tag, MAX_NAME_BYTES)
    }
}

impl Bounded for Competition {
    fn check_bounds(&self) -> Result<(), Status> {
        text("competition id", &self.id, MAX_NAME_BYTES)?;
        text("title", &self.title, MAX_TEXT_BYTES)?;
        entries("datasets", self.datasets.len(), MAX_LIST_ENTRIES)?;
        for d in &self.datasets {
            text("dataset name", &d.name, MAX_NAME_BYTES)?;
            text("metric", &d.metric, MAX_TEXT_BYTES)?;
        }
        entries("teams", self.teams.len(), MAX_LIST_ENTRIES)?;
        let mut members = 0usize;
        for t in &self.teams {
            text("team name", &t.name, MAX_NAME_BYTES)?;
            texts("members", &t.members, MAX_USERNAME_BYTES)?;
            members = members.saturating_add(t.members.len());
        }
        entries("the teams' members", members, MAX_LIST_ENTRIES)?;
        entries("environments", self.environments.len(), MAX_LIST_ENTRIES)?;
        for e in &self.environments {
            text("environment name", &e.name, MAX_NAME_BYTES)?;
            text("environment python", &e.python, MAX_TEXT_BYTES)?;
            text("environment description", &e.description, MAX_TEXT_BYTES)?;
        }
        if let Some(p) = &self.policy {
            entries("rounds", p.rounds.len(), MAX_LIST_ENTRIES)?;
            for r in &p.rounds {
                text("round name", &r.name, MAX_NAME_BYTES)?;
                entries("a round's datasets", r.datasets.len(), MAX_LIST_ENTRIES)?;
                texts("round datasets", &r.datasets, MAX_NAME_BYTES)?;
            }
        }
        texts("hosts", &self.hosts, MAX_USERNAME_BYTES)
    }
}

impl Bounded for ApplyCompetitionRequest {
    fn check_bounds(&self) -> Result<(), Status> {
        if let Some(c) = &self.competition {
            c.check_bounds()?;
        }
        entries("users", self.users.len(), MAX_LIST_ENTRIES)?;
        for u in &self.users {
            text("username", &u.username, MAX_USERNAME_BYTES)?;
            text("password", &u.password, MAX_PASSWORD_BYTES)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_field_is_refused_with_its_size_and_the_limit() {
        let req = MemoRequest {
            name: "demo/t1/1".into(),
            memo: "x".repeat(8 * 1024 * 1024),
        };
        let err = req.check_bounds().unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "memo is 8388608 bytes; the limit is 1024 bytes"
        );
        let ok = MemoRequest {
            name: "demo/t1/1".into(),
            memo: "x".repeat(MAX_MEMO_BYTES),
        };
        assert!(ok.check_bounds().is_ok(), "the limit itself is allowed");
    }

    #[test]
    fn what_participant_code_reports_and_saves_is_bounded() {
        let point = MetricPoint {
            metrics_json: "x".repeat(MAX_METRICS_BYTES + 1),
            ..Default::default()
        };
        let report = RunnerReportRequest {
            name: "demo/t1/1".into(),
            point: Some(point),
        };
        let err = report.check_bounds().unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "metrics_json is 65537 bytes; the limit is 65536 bytes"
        );
        let meta = CheckpointMeta {
            session: "demo/t1/1".into(),
            checkpoint: "best".into(),
            summary_json: "x".repeat(MAX_METRICS_BYTES + 1),
        };
        assert!(
            meta.check_bounds().is_err(),
            "a checkpoint's summary is bounded"
        );
    }

    #[test]
    fn usernames_and_lists_are_bounded() {
        let login = LoginRequest {
            username: "u".repeat(30 << 20),
            password: "p".into(),
        };
        assert!(
            login
                .check_bounds()
                .unwrap_err()
                .message()
                .starts_with("username is 31457280 bytes; the limit is 63 bytes")
        );
        let manifest = ApplyCompetitionRequest {
            competition: Some(Competition {
                id: "c".into(),
                hosts: vec!["h".into(); MAX_LIST_ENTRIES + 1],
                ..Default::default()
            }),
            users: vec![],
        };
        assert_eq!(
            manifest.check_bounds().unwrap_err().message(),
            "hosts has 10001 entries; the limit is 10000 entries"
        );
    }

    #[test]
    fn a_shown_value_is_short_and_inert() {
        assert_eq!(shown("demo/t1/3"), "demo/t1/3");
        let long = "a".repeat(1 << 20);
        let s = shown(&long);
        assert_eq!(s, format!("{}… (1048576 bytes)", "a".repeat(SHOWN_CHARS)));
        assert_eq!(shown("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        // Multi-byte characters are never split.
        let wide = "é".repeat(100);
        assert!(shown(&wide).starts_with(&"é".repeat(SHOWN_CHARS)));
    }
}
