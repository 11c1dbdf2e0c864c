//! Who may call what, checked from the outside: calls any method by its path through the gateway (or
//! straight at a service) as a chosen caller, and tabulates every (method, caller) answer against the access
//! rules, so that a failing test prints the whole matrix and names each row that differs.
//!
//! Calls go out as encoded protobuf over a pass-through codec: the matrix needs no generated client per
//! method, reaches methods newer than anything this crate names, and sends whatever metadata a test forges.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use bytes::{Buf, BufMut};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;

/// Passes encoded messages through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

/// The encoding half of [`RawCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

/// The decoding half of [`RawCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// One request message, encoded.
pub fn msg(m: impl prost::Message) -> Vec<Vec<u8>> {
    vec![m.encode_to_vec()]
}

/// Metadata carrying `token` as a bearer token.
pub fn bearer(token: Option<&str>) -> MetadataMap {
    let mut md = MetadataMap::new();
    if let Some(t) = token
        && let Ok(v) = MetadataValue::try_from(format!("Bearer {t}"))
    {
        md.insert("authorization", v);
    }
    md
}

/// Calls `method` (`/nsml.v1.Service/Method`) with `messages` (one for a unary call, several for a client
/// stream) and `metadata`; returns every response message, or the first error, whether it came before the
/// response or in the middle of a stream.
pub async fn call_raw(
    channel: &Channel,
    method: &str,
    metadata: MetadataMap,
    messages: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let path = http::uri::PathAndQuery::try_from(method)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad method path `{method}`: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    let mut req = tonic::Request::new(tokio_stream::iter(messages));
    *req.metadata_mut() = metadata;
    // A live view (`Watch…`) stays open: its first answer is what the caller may see.
    let live = method
        .rsplit('/')
        .next()
        .is_some_and(|m| m.starts_with("Watch"));
    let mut stream = grpc.streaming(req, path, RawCodec).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
        if live {
            break;
        }
    }
    Ok(out)
}

/// The kinds of caller every public method is tried as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Who {
    /// No token.
    Anonymous,
    /// A participant of another team in the same competition.
    OtherTeam,
    /// A host of another competition only.
    OtherHost,
    /// A participant of the team the call is about.
    Team,
    /// A host of the competition (not a platform administrator).
    Host,
    /// The platform administrator.
    Admin,
}

impl Who {
    /// Every caller, in the order rows are tried: the ones usually refused first, so that an allowed call
    /// that changes something (removes a session) comes after the refusals it is compared with.
    pub const ALL: [Who; 6] = [
        Who::Anonymous,
        Who::OtherTeam,
        Who::OtherHost,
        Who::Team,
        Who::Host,
        Who::Admin,
    ];

    /// A column heading.
    pub fn label(self) -> &'static str {
        match self {
            Who::Anonymous => "anonymous",
            Who::OtherTeam => "other-team",
            Who::OtherHost => "other-host",
            Who::Team => "team",
            Who::Host => "host",
            Who::Admin => "admin",
        }
    }
}

/// The tokens of every caller but the anonymous one.
#[derive(Debug, Clone, Default)]
pub struct Callers {
    tokens: Vec<(Who, String)>,
}

impl Callers {
    /// Sets the token `who` calls with.
    pub fn set(&mut self, who: Who, token: String) {
        self.tokens.retain(|(w, _)| *w != who);
        self.tokens.push((who, token));
    }

    /// The token `who` calls with (`None` for the anonymous caller, or one not set).
    pub fn token(&self, who: Who) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(w, _)| *w == who)
            .map(|(_, t)| t.as_str())
    }

    /// Every token, for tests that look for them where they must not be.
    pub fn all_tokens(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(|(_, t)| t.as_str())
    }
}

/// A check on what an allowed call answered (the response messages, encoded).
pub type Check = std::sync::Arc<dyn Fn(&[Vec<u8>]) -> Result<(), String> + Send + Sync>;

/// One public method called one way, with the answer each caller must get.
#[derive(Clone)]
pub struct Row {
    /// `Service/Method`.
    pub rpc: String,
    /// What the call is about, e.g. the session it names.
    pub target: String,
    messages: Vec<Vec<u8>>,
    /// Expected code per caller, in [`Who::ALL`]'s order; `None`: not tried as that caller.
    expect: [Option<Code>; 6],
    checks: Vec<(Who, Check)>,
}

/// The reads that have a live view (`Watch…`) answering the same, as the API pairs them.
const LIVE_VIEWS: &[(&str, &str)] = &[
    ("SessionService/List", "SessionService/Watch"),
    ("SessionService/Metrics", "SessionService/WatchMetrics"),
    ("SubmissionService/List", "SubmissionService/Watch"),
    ("LeaderboardService/Board", "LeaderboardService/WatchBoard"),
    (
        "LeaderboardService/Overall",
        "LeaderboardService/WatchOverall",
    ),
    ("QuotaService/Usage", "QuotaService/WatchUsage"),
];

/// `rows`, each read that has a live view followed by the same row asked of the view: its first answer must
/// pass what the read's answer passes, for every caller.
pub fn with_live_views(rows: Vec<Row>) -> Vec<Row> {
    let mut out = Vec::with_capacity(rows.len() * 2);
    for row in rows {
        let live = LIVE_VIEWS
            .iter()
            .find(|(read, _)| *read == row.rpc)
            .map(|(_, view)| Row {
                rpc: view.to_string(),
                ..row.clone()
            });
        out.push(row);
        out.extend(live);
    }
    out
}

/// Shorthands for the expectation arrays of [`Row::new`]: `[anonymous, other-team, other-host, team, host,
/// admin]`.
pub mod codes {
    use tonic::Code;

    pub const OK: Option<Code> = Some(Code::Ok);
    pub const UNAUTH: Option<Code> = Some(Code::Unauthenticated);
    pub const DENIED: Option<Code> = Some(Code::PermissionDenied);
    pub const NOT_FOUND: Option<Code> = Some(Code::NotFound);
    pub const INVALID: Option<Code> = Some(Code::InvalidArgument);
    pub const FAILED: Option<Code> = Some(Code::FailedPrecondition);
    pub const SKIP: Option<Code> = None;
}

impl Row {
    /// `rpc` is `Service/Method`; `expect` lists the code per caller in [`Who::ALL`]'s order.
    pub fn new(rpc: &str, target: &str, messages: Vec<Vec<u8>>, expect: [Option<Code>; 6]) -> Self {
        Self {
            rpc: rpc.to_string(),
            target: target.to_string(),
            messages,
            expect,
            checks: Vec::new(),
        }
    }

    /// Adds a check on what `who` got back (the call must also answer OK).
    pub fn check(
        mut self,
        who: Who,
        f: impl Fn(&[Vec<u8>]) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((who, std::sync::Arc::new(f)));
        self
    }

    /// Adds one check for several callers.
    pub fn check_each(
        mut self,
        whos: &[Who],
        f: impl Fn(Who, &[Vec<u8>]) -> Result<(), String> + Send + Sync + Clone + 'static,
    ) -> Self {
        for &w in whos {
            let f = f.clone();
            self.checks.push((w, std::sync::Arc::new(move |r| f(w, r))));
        }
        self
    }

    fn expected(&self, who: Who) -> Option<Code> {
        Who::ALL
            .iter()
            .position(|w| *w == who)
            .and_then(|i| self.expect[i])
    }

    fn method(&self) -> String {
        path_of(&self.rpc)
    }
}

/// What one caller got from one row.
#[derive(Debug, Clone)]
pub struct Cell {
    pub who: Who,
    pub expected: Code,
    pub got: Code,
    pub message: String,
    /// Why a check on the answer failed.
    pub check_failed: Option<String>,
    /// The method does not exist in this build (a newer API than the deployment's): not counted.
    pub unimplemented: bool,
}

impl Cell {
    fn ok(&self) -> bool {
        self.unimplemented || (self.expected == self.got && self.check_failed.is_none())
    }
}

/// The answers of a set of rows.
#[derive(Default)]
pub struct Matrix {
    rows: Vec<(String, String, Vec<Cell>)>,
}

fn short(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Unauthenticated => "UNAUTH",
        Code::PermissionDenied => "DENIED",
        Code::NotFound => "NOT_FOUND",
        Code::InvalidArgument => "INVALID",
        Code::FailedPrecondition => "FAILED_PRE",
        Code::ResourceExhausted => "EXHAUSTED",
        Code::Unimplemented => "UNIMPL",
        Code::AlreadyExists => "EXISTS",
        Code::Unavailable => "UNAVAIL",
        _ => "OTHER",
    }
}

impl Matrix {
    /// Calls every row as every caller it names, in order, through `channel`.
    pub async fn run(&mut self, channel: &Channel, callers: &Callers, rows: &[Row]) {
        for row in rows {
            let mut cells = Vec::new();
            for who in Who::ALL {
                let Some(expected) = row.expected(who) else {
                    continue;
                };
                let token = callers.token(who);
                if who != Who::Anonymous && token.is_none() {
                    continue;
                }
                let answer =
                    call_raw(channel, &row.method(), bearer(token), row.messages.clone()).await;
                let (got, message) = match &answer {
                    Ok(_) => (Code::Ok, String::new()),
                    Err(s) => (s.code(), s.message().to_string()),
                };
                let check_failed = match &answer {
                    Ok(resp) => row
                        .checks
                        .iter()
                        .filter(|(w, _)| *w == who)
                        .find_map(|(_, f)| f(resp).err()),
                    Err(_) => None,
                };
                cells.push(Cell {
                    who,
                    expected,
                    got,
                    message,
                    check_failed,
                    unimplemented: got == Code::Unimplemented && expected != Code::Unimplemented,
                });
            }
            self.rows.push((row.rpc.clone(), row.target.clone(), cells));
        }
    }

    /// Records a row checked by hand (a call that needs its own set-up).
    pub fn record(&mut self, rpc: &str, target: &str, cells: Vec<Cell>) {
        self.rows.push((rpc.to_string(), target.to_string(), cells));
    }

    /// Every cell that differs from the rules, each naming its row and caller.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (rpc, target, cells) in &self.rows {
            for c in cells.iter().filter(|c| !c.ok()) {
                let mut line = format!(
                    "{rpc} ({target}) as {}: expected {:?}, got {:?}",
                    c.who.label(),
                    c.expected,
                    c.got
                );
                if !c.message.is_empty() {
                    let _ = write!(line, " `{}`", c.message);
                }
                if let Some(why) = &c.check_failed {
                    let _ = write!(line, "; answer wrong: {why}");
                }
                out.push(line);
            }
        }
        out
    }

    /// Methods (`Service/Method`) the matrix called.
    pub fn methods(&self) -> BTreeSet<String> {
        self.rows.iter().map(|(r, _, _)| r.clone()).collect()
    }

    /// The matrix as a table: one line per row, the code each caller got (`!` marks a difference, `~` a
    /// method this build does not have).
    pub fn table(&self) -> String {
        let mut s = format!("{:<44} {:<22}", "method", "about");
        for w in Who::ALL {
            let _ = write!(s, " {:<11}", w.label());
        }
        s.push('\n');
        for (rpc, target, cells) in &self.rows {
            let _ = write!(s, "{rpc:<44} {:<22}", truncate(target, 22));
            for w in Who::ALL {
                let shown = match cells.iter().find(|c| c.who == w) {
                    None => "-".to_string(),
                    Some(c) if c.unimplemented => "~".to_string(),
                    Some(c) if c.ok() => short(c.got).to_string(),
                    Some(c) => format!("!{}", short(c.got)),
                };
                let _ = write!(s, " {shown:<11}");
            }
            s.push('\n');
        }
        s
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// A cell built by hand, for [`Matrix::record`].
pub fn cell(who: Who, expected: Code, answer: &Result<Vec<Vec<u8>>, tonic::Status>) -> Cell {
    let (got, message) = match answer {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    };
    Cell {
        who,
        expected,
        got,
        message,
        check_failed: None,
        unimplemented: false,
    }
}

/// Methods the API declares, read from the `.proto` files under `proto_dir`: (`Service/Method`, internal),
/// where internal means the comment right above the method starts with `Internal`. (Methods that follow
/// such a method without a comment of their own count as public here: a test that checks every public
/// method has a row in the matrix then names them unless the gateway refuses them.)
pub fn declared_methods(proto_dir: &Path) -> anyhow::Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(proto_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let mut service = None::<String>;
        let mut internal = false;
        let mut in_comment = false;
        // Inside an rpc's own `{ option …; }` block, whose `}` does not end the service.
        let mut in_rpc_block = false;
        for line in text.lines().map(str::trim) {
            if in_rpc_block {
                in_rpc_block = line != "}";
                continue;
            }
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(String::from);
                internal = false;
                in_comment = false;
            } else if let Some(c) = line.strip_prefix("//") {
                if !in_comment {
                    internal = c.trim_start().starts_with("Internal");
                }
                in_comment = true;
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let is_internal = internal && in_comment;
                in_comment = false;
                internal = false;
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if let Some(svc) = &service {
                    out.push((format!("{svc}/{name}"), is_internal));
                }
                in_rpc_block = line.ends_with('{');
            } else if line.is_empty() || line == "}" {
                internal = false;
                in_comment = false;
                if line == "}" {
                    service = None;
                }
            }
        }
    }
    Ok(out)
}

/// The gRPC path of a method named `Service/Method` (of `nsml.v1`) or `nsml.internal.v1.Service/Method`.
pub fn path_of(rpc: &str) -> String {
    if rpc.starts_with("nsml.") {
        format!("/{rpc}")
    } else {
        format!("/nsml.v1.{rpc}")
    }
}

/// The platform's internal methods (every method of `nsml.internal.v1`), as `nsml.internal.v1.Service/Method`.
pub fn gateway_internal_methods() -> Vec<String> {
    nsml_proto::internal::v1::INTERNAL_METHODS
        .iter()
        .map(|m| m.trim_start_matches('/').to_string())
        .collect()
}
