//! The runner's one error type.

/// Everything that can go wrong while the runner prepares, runs or serves a session.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// An archive entry would write outside its destination or is a kind the runner refuses.
    #[error("unsafe archive entry `{path}`: {why}")]
    UnsafeArchive { path: String, why: String },
    /// An archive expands past what the runner accepts.
    #[error("archive expands past the limit of {limit} {what}")]
    ArchiveTooLarge { limit: u64, what: &'static str },
    /// A dataset part's archive is not laid out as any accepted shape.
    #[error("dataset `{dataset}` part {part} has an unexpected layout: {detail}")]
    DatasetLayout {
        dataset: String,
        part: &'static str,
        detail: String,
    },
    /// A call to another service failed.
    #[error("{call} failed: {}", status.message())]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    /// The session asked for more GPUs than are free on this machine.
    #[error("not enough free GPUs: asked {asked}, free {free} of {total}")]
    NotEnoughGpus { asked: u32, free: u32, total: u32 },
    /// `nvidia-smi` printed something the runner cannot read.
    #[error("cannot read the GPU list: {0}")]
    GpuList(String),
    /// The entry named by the session is not a file inside the uploaded code.
    #[error("entry file {entry} not found in the uploaded code")]
    EntryNotFound { entry: String },
    /// The session's argument string cannot be split like a shell would.
    #[error("invalid args `{args}`: {why}")]
    Args { args: String, why: &'static str },
    /// The session spec cannot be run as given.
    #[error("invalid session `{name}`: {why}")]
    Session { name: String, why: String },
    /// The session's SDK socket cannot be opened.
    #[error("cannot open the SDK socket: {0}")]
    SdkSocket(Box<RunnerError>),
    /// The executor is being dropped and starts nothing more.
    #[error("the runner is shutting down")]
    ShuttingDown,
    /// A session with this name is already running here.
    #[error("session `{0}` is already running on this runner")]
    AlreadyRunning(String),
    /// The SDK asked for something its session may not do.
    #[error("{0}")]
    Refused(String),
    /// Participant code cannot be confined on this machine (a tool or kernel feature is missing).
    #[error("{0}")]
    Sandbox(String),
    /// A session's cgroup cannot be made, limited or read.
    #[error("cannot set up the session's cgroup: {what}: {source}")]
    Cgroup {
        what: String,
        source: std::io::Error,
    },
    /// The session's Python environment cannot be made (a refused requirement, a failed install).
    #[error("{0}")]
    Environment(String),
    /// A runner setting has a value the runner cannot use.
    #[error("invalid runner setting {what}: {why}")]
    Config { what: String, why: String },
}

impl RunnerError {
    /// Wraps an I/O error with what the runner was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps a failed call to another service.
    pub fn rpc(call: &'static str, status: tonic::Status) -> Self {
        Self::Rpc { call, status }
    }

    /// The text shown to participant code over the SDK socket: a service's own message (e.g. a storage
    /// quota refusal) rather than the runner's wrapping of it.
    pub fn reply_text(&self) -> String {
        match self {
            Self::Rpc { status, .. } if !status.message().is_empty() => {
                status.message().to_string()
            }
            other => other.to_string(),
        }
    }
}

/// The runner's result type.
pub type Result<T, E = RunnerError> = std::result::Result<T, E>;
