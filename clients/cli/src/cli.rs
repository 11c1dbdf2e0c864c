//! The command tree: every command, flag and argument, with the help text `nsml --help` shows.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
The participant's loop:
  nsml login
  nsml run -d DATASET -e main.py          upload this directory and start training
  nsml ps / nsml logs -f SESSION          watch it
  nsml model ls SESSION                   list the checkpoints it saved
  nsml submit -t SESSION CHECKPOINT       trial submit on the small test set, logs visible
  nsml submit SESSION CHECKPOINT          real submit; the score goes to the leaderboard
  nsml dataset board DATASET              see the ranking

Environment:
  NSML_SERVER       server address, when --server is not given
  NSML_TOKEN        token to use instead of the one `nsml login` stored
  NSML_CONFIG_DIR   where `nsml login` stores credentials (default ~/.nsml)

Exit status:
  0  the command did what it was asked
  1  the server refused it or something failed (the message says what): a refused run or submit, a session or
     submission that failed, a submit not finished in time, an audit that found a mismatch or a broken log
  2  the command was called wrongly (an unknown flag, a missing or malformed argument)";

/// The NSML command-line client: train models, watch sessions, submit checkpoints and follow the leaderboards
/// of an NSML server.
#[derive(Debug, Parser)]
#[command(name = "nsml", version, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    /// Server address [default: $NSML_SERVER, else the server of `nsml login`, else http://127.0.0.1:7100]
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

/// `-j/--json` of listing commands.
#[derive(Debug, Clone, Copy, Args)]
pub struct Json {
    /// Print JSON instead of a table
    #[arg(short = 'j', long = "json")]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Log in and store the token for later commands
    Login {
        /// User name (prompted for when omitted)
        #[arg(short = 'u', long = "username", value_name = "NAME")]
        username: Option<String>,
        /// Read the password from the first line of standard input instead of prompting
        #[arg(long)]
        password_stdin: bool,
    },
    /// Revoke the stored token and forget it
    Logout,
    /// Show who you are logged in as: your teams and the competitions you host
    Whoami {
        #[command(flatten)]
        json: Json,
    },
    /// List datasets and show their leaderboards
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Show the overall ranking of a competition across its datasets
    Board {
        /// Competition id (default: your only competition)
        competition: Option<String>,
        /// Show the private leaderboard (once the host revealed it)
        #[arg(long)]
        private: bool,
        #[command(flatten)]
        json: Json,
    },
    /// List your team's submissions and their scores
    History {
        /// Only submissions to this dataset
        #[arg(short = 'd', long = "dataset", value_name = "DATASET")]
        dataset: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Upload the current directory and start a training session
    ///
    /// A `requirements.txt` in the directory is installed into the session's Python environment (cached for
    /// the next sessions); `#nsml: NAME` as the entry's first line selects one of the competition's host
    /// environments.
    Run(RunArgs),
    /// List sessions
    Ps(PsArgs),
    /// Print a session's output
    Logs {
        /// Keep printing until the session ends
        #[arg(short = 'f', long = "follow")]
        follow: bool,
        /// Session name, TEAM/DATASET/N
        session: String,
    },
    /// Stop a running session
    Stop {
        /// Session name, TEAM/DATASET/N
        session: String,
    },
    /// Remove sessions and their checkpoints
    Rm {
        /// Also stop sessions that are still running
        #[arg(short = 'f', long = "force")]
        force: bool,
        /// Session names; `*` and `?` are wildcards (quote them: 'me/kin/1*')
        #[arg(required = true, value_name = "PATTERN")]
        patterns: Vec<String>,
    },
    /// Set a session's memo (the Description column of `nsml ps`)
    Memo {
        /// Session name, TEAM/DATASET/N
        session: String,
        /// The memo
        text: String,
    },
    /// List, delete and download the checkpoints a session saved
    #[command(subcommand)]
    Model(ModelCommand),
    /// Submit a checkpoint for scoring
    Submit {
        /// Trial submit: runs on the small trial set with its output visible, scores nothing on the leaderboard
        #[arg(short = 't', long = "trial", visible_alias = "test")]
        trial: bool,
        /// The training session, TEAM/DATASET/N
        session: String,
        /// The checkpoint, as `nsml model ls` lists it
        checkpoint: String,
    },
    /// Show your team's quota: usage against every limit, the sessions holding resources, storage, and when
    /// the next real submit is allowed on each dataset, and why
    Quota {
        /// Competition id (default: your only competition)
        competition: Option<String>,
        /// Another team's quota (hosts only)
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Host and administrator commands
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Print a shell completion script: `source <(nsml completion bash)`, or write it where your shell
    /// loads completions (zsh: a file `_nsml` on `$fpath`; fish: `~/.config/fish/completions/nsml.fish`)
    Completion {
        /// The shell to complete in
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// List the datasets you can train on
    Ls {
        #[command(flatten)]
        json: Json,
    },
    /// Show a dataset's leaderboard
    Board {
        /// Dataset name
        dataset: String,
        /// Show the private leaderboard (once the host revealed it)
        #[arg(long)]
        private: bool,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Dataset to train on
    #[arg(short = 'd', long = "dataset", value_name = "DATASET")]
    pub dataset: String,
    /// Entry file, relative to the uploaded directory
    #[arg(
        short = 'e',
        long = "entry",
        default_value = "main.py",
        value_name = "FILE"
    )]
    pub entry: String,
    /// GPUs (0 = CPU only)
    #[arg(short = 'g', long = "gpus", default_value_t = 1, value_name = "N")]
    pub gpus: u32,
    /// CPUs
    #[arg(short = 'c', long = "cpus", default_value_t = 2, value_name = "N")]
    pub cpus: u32,
    /// Memory limit, shared memory not included: the session may hold --memory plus --shm, and the team's
    /// memory quota counts both (e.g. 24G, 512M, 1.5G)
    #[arg(long, default_value = "24G", value_parser = parse_size_arg, value_name = "SIZE")]
    pub memory: u64,
    /// Shared memory (/dev/shm) size, on top of --memory
    #[arg(long = "shm", visible_alias = "shm-size", default_value = "1G", value_parser = parse_size_arg, value_name = "SIZE")]
    pub shm: u64,
    /// Arguments passed to the entry file
    #[arg(
        short = 'a',
        long = "args",
        default_value = "",
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: String,
    /// Memo shown in the Description column of `nsml ps`
    #[arg(
        short = 'm',
        long = "memo",
        default_value = "",
        hide_default_value = true,
        value_name = "TEXT"
    )]
    pub memo: String,
    /// Follow the session's output, and remove the session when it ends
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Directory to upload
    #[arg(long = "dir", default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Include sessions that ended
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Only the N most recent sessions
    #[arg(short = 'n', long = "last", value_name = "N")]
    pub last: Option<u32>,
    /// Only sessions on this dataset
    #[arg(short = 'd', long = "dataset", value_name = "DATASET")]
    pub dataset: Option<String>,
    /// Only sessions whose name or memo contains TEXT
    #[arg(short = 's', long = "search", value_name = "TEXT")]
    pub search: Option<String>,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// List a session's checkpoints
    Ls {
        #[command(flatten)]
        json: Json,
        /// Session name, TEAM/DATASET/N
        session: String,
    },
    /// Delete a checkpoint ("*" deletes them all)
    Rm {
        /// Session name, TEAM/DATASET/N
        session: String,
        /// Checkpoint name, or "*" for every checkpoint
        checkpoint: String,
    },
    /// Download a checkpoint into a directory
    Pull {
        /// Session name, TEAM/DATASET/N
        session: String,
        /// Checkpoint name
        checkpoint: String,
        /// Target directory [default: ./TEAM_DATASET_N_CHECKPOINT]
        path: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Register and list competitions
    #[command(subcommand)]
    Competition(AdminCompetitionCommand),
    /// Manage participants
    #[command(subcommand)]
    User(AdminUserCommand),
    /// Manage leaderboards
    #[command(subcommand)]
    Board(AdminBoardCommand),
    /// Grant a team an extra submit or a raised quota, or re-open a submit's slot, recorded in its ledger with
    /// who, why and when
    #[command(subcommand)]
    Override(AdminOverrideCommand),
    /// Audit admission decisions: replay them, explain one, verify the log, export a team's ledger
    #[command(subcommand)]
    Audit(AdminAuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum AdminCompetitionCommand {
    /// Register or update a competition, its datasets, teams and users from a manifest
    Apply {
        /// The competition manifest (TOML)
        file: PathBuf,
    },
    /// List competitions
    Ls {
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminUserCommand {
    /// Create a participant in a team
    Add {
        /// User name
        name: String,
        /// The team the user joins
        #[arg(long, value_name = "TEAM")]
        team: String,
        /// The competition the team enters [default: every competition the team already entered]
        #[arg(long, value_name = "ID")]
        competition: Option<String>,
        /// Read the password from the first line of standard input instead of prompting
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminBoardCommand {
    /// Make a competition's private leaderboard visible to participants
    Reveal {
        /// Competition id
        competition: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminOverrideCommand {
    /// Let the team's next real submit on a dataset ignore the submit interval once (also re-opens the slot of
    /// a failed submit)
    Submit {
        /// The team
        #[arg(long, value_name = "TEAM")]
        team: String,
        /// The dataset
        #[arg(long, short = 'd', value_name = "DATASET")]
        dataset: String,
        /// Why: recorded in the team's ledger and shown by `admin audit explain`
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// The failed submit whose slot this re-opens, for the record
        #[arg(long, value_name = "SUBMISSION")]
        submission: Option<String>,
        /// Competition id [default: the dataset's]
        #[arg(long, value_name = "ID")]
        competition: Option<String>,
    },
    /// Re-open the slot a real submit took: in flight (stuck), it no longer counts as the team's submit in
    /// flight; succeeded (say, scored wrongly), the submit interval no longer counts from it
    ReopenSubmit {
        /// The team
        #[arg(long, value_name = "TEAM")]
        team: String,
        /// The submission whose slot is re-opened (`admin audit export --team TEAM` lists the team's submits)
        #[arg(long, value_name = "SUBMISSION")]
        submission: String,
        /// Why: recorded in the team's ledger and shown by `admin audit explain`
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Competition id [default: the submission's dataset's]
        #[arg(long, value_name = "ID")]
        competition: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Raise the team's limits until a time (each given value is the new limit)
    Quota {
        /// The team
        #[arg(long, value_name = "TEAM")]
        team: String,
        /// GPUs
        #[arg(long, value_name = "N")]
        gpus: Option<u32>,
        /// CPUs
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// Memory, shared memory included (e.g. 200G)
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        memory: Option<u64>,
        /// Concurrent sessions
        #[arg(long, value_name = "N")]
        sessions: Option<u32>,
        /// When the raise ends (RFC 3339, e.g. 2026-12-01T00:00:00Z)
        #[arg(long, value_parser = parse_time_arg, value_name = "TIME")]
        until: i64,
        /// Why: recorded in the team's ledger and shown by `admin audit explain`
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Competition id [default: the team's only competition]
        #[arg(long, value_name = "ID")]
        competition: Option<String>,
    },
    /// Extend one team's deadline past the competition's closing time (or a round's, with --round): its submits
    /// admitted before then count
    Deadline {
        /// The team
        #[arg(long, value_name = "TEAM")]
        team: String,
        /// The team's new deadline (RFC 3339, e.g. 2026-12-01T00:00:00Z)
        #[arg(long, value_parser = parse_time_arg, value_name = "TIME")]
        until: i64,
        /// Why: recorded in the team's ledger and shown by `admin audit explain`
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// The round whose deadline to extend, by its name in the manifest [default: the competition's
        /// deadline]
        #[arg(long, value_name = "NAME")]
        round: Option<String>,
        /// Competition id [default: the team's only competition]
        #[arg(long, value_name = "ID")]
        competition: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminAuditCommand {
    /// Rebuild the ledgers from the log, re-derive every admission decision, and list the mismatches
    Replay {
        /// Only decisions of this competition
        #[arg(long, value_name = "ID")]
        competition: Option<String>,
        /// Only this team's ledger
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
        /// Only what was recorded until this time (RFC 3339, e.g. 2026-12-01T00:00:00Z)
        #[arg(long, value_parser = parse_time_arg, value_name = "TIME")]
        until: Option<i64>,
        #[command(flatten)]
        json: Json,
    },
    /// Show the state a decision saw, the rule that fired and the ledger events it rests on
    Explain {
        /// A session name (TEAM/DATASET/N), a submission id or a decision id
        id: String,
        #[command(flatten)]
        json: Json,
    },
    /// Check the hash chain of the whole log and name the first event edited, deleted, inserted or reordered
    Verify {
        #[command(flatten)]
        json: Json,
    },
    /// Print a team's ledger and decisions as JSON lines, to hand to the team in a dispute
    Export {
        /// The team
        #[arg(long, value_name = "TEAM")]
        team: String,
    },
}

/// Parses a time given as RFC 3339 (`2026-12-01T00:00:00Z`) into milliseconds since the epoch.
fn parse_time_arg(value: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{e}: give a time as RFC 3339, e.g. 2026-12-01T00:00:00Z"))
}

/// Parses a `--memory`/`--shm` size, explaining the format when it is wrong.
fn parse_size_arg(value: &str) -> Result<u64, String> {
    nsml_manifest::parse_size(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_nsml_flags_and_sizes() {
        let cli = Cli::try_parse_from([
            "nsml",
            "run",
            "-d",
            "t1-cls",
            "-g",
            "0",
            "-c",
            "8",
            "--memory",
            "75G",
            "--shm-size",
            "10G",
            "-a",
            "--epochs 3",
            "-m",
            "first try",
            "-i",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.dataset, "t1-cls");
        assert_eq!(run.entry, "main.py");
        assert_eq!((run.gpus, run.cpus), (0, 8));
        assert_eq!(run.memory, 75 << 30);
        assert_eq!(run.shm, 10 << 30);
        assert_eq!(run.args, "--epochs 3");
        assert!(run.interactive);
    }

    #[test]
    fn bad_sizes_are_usage_errors_that_explain_the_format() {
        let err = Cli::try_parse_from(["nsml", "run", "-d", "x", "--memory", "lots"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("24G, 512M, 1.5G"), "{err}");
    }

    #[test]
    fn overrides_take_sizes_and_times() {
        let cli = Cli::try_parse_from([
            "nsml",
            "admin",
            "override",
            "quota",
            "--team",
            "demo",
            "--gpus",
            "4",
            "--memory",
            "200G",
            "--until",
            "2026-12-01T00:00:00Z",
            "--reason",
            "final week",
        ])
        .unwrap();
        let Command::Admin(AdminCommand::Override(AdminOverrideCommand::Quota {
            gpus,
            memory,
            until,
            cpus,
            ..
        })) = cli.command
        else {
            panic!("not override quota")
        };
        assert_eq!((gpus, cpus, memory), (Some(4), None, Some(200 << 30)));
        assert_eq!(until, 1_796_083_200_000);
        let cli = Cli::try_parse_from([
            "nsml",
            "admin",
            "override",
            "reopen-submit",
            "--team",
            "demo",
            "--submission",
            "sub-7",
            "--reason",
            "scorer stuck",
            "-j",
        ])
        .unwrap();
        let Command::Admin(AdminCommand::Override(AdminOverrideCommand::ReopenSubmit {
            team,
            submission,
            json,
            competition,
            ..
        })) = cli.command
        else {
            panic!("not override reopen-submit")
        };
        assert_eq!((team.as_str(), submission.as_str()), ("demo", "sub-7"));
        assert!(json.json && competition.is_none());
        let err = Cli::try_parse_from(["nsml", "admin", "audit", "replay", "--until", "tomorrow"])
            .unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }

    #[test]
    fn server_is_accepted_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["nsml", "ps", "-a", "--server", "http://h:1", "-j"]).unwrap();
        assert_eq!(cli.server.as_deref(), Some("http://h:1"));
        let Command::Ps(ps) = cli.command else {
            panic!("not ps")
        };
        assert!(ps.all && ps.json.json);
    }
}
