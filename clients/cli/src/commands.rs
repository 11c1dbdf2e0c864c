//! One function per command; [`dispatch`] routes the parsed command line to it.

mod account;
mod admin;
mod audit;
mod boards;
mod models;
mod quota;
mod run;
mod sessions;
mod submit;

use anyhow::Result;

use crate::api::Api;
use crate::cli::{
    AdminAuditCommand, AdminBoardCommand, AdminCommand, AdminCompetitionCommand,
    AdminOverrideCommand, AdminUserCommand, Command, DatasetCommand, ModelCommand,
};
use crate::config::{CredentialStore, Target};

/// What every command may need: where credentials live, what was stored, and the server and token to use.
#[derive(Debug)]
pub struct Context {
    pub store: CredentialStore,
    pub target: Target,
}

impl Context {
    /// Returns the gateway client carrying the token.
    pub fn api(&self) -> Result<Api> {
        Api::new(&self.target.server, self.target.token.clone())
    }
}

/// Runs one command.
pub async fn dispatch(ctx: &Context, command: Command) -> Result<()> {
    match command {
        Command::Login {
            username,
            password_stdin,
        } => account::login(ctx, username, password_stdin).await,
        Command::Logout => account::logout(ctx).await,
        Command::Whoami { json } => account::whoami(ctx, json.json).await,
        Command::Dataset(command) => dispatch_dataset(ctx, command).await,
        Command::Board {
            competition,
            private,
            json,
        } => boards::overall(ctx, competition, private, json.json).await,
        Command::History { dataset, json } => boards::history(ctx, dataset, json.json).await,
        Command::Run(args) => run::run(ctx, args).await,
        Command::Ps(args) => sessions::ps(ctx, args).await,
        Command::Logs { follow, session } => sessions::logs(ctx, &session, follow).await,
        Command::Stop { session } => sessions::stop(ctx, &session).await,
        Command::Rm { force, patterns } => sessions::rm(ctx, &patterns, force).await,
        Command::Memo { session, text } => sessions::memo(ctx, &session, &text).await,
        Command::Model(command) => dispatch_model(ctx, command).await,
        Command::Submit {
            trial,
            session,
            checkpoint,
        } => submit::submit(ctx, &session, &checkpoint, trial).await,
        Command::Quota {
            competition,
            team,
            json,
        } => quota::quota(ctx, competition, team, json.json).await,
        Command::Admin(command) => dispatch_admin(ctx, command).await,
        Command::Completion { shell } => {
            let mut command = <crate::cli::Cli as clap::CommandFactory>::command();
            // Into memory first, then out as every listing goes: a closed pipe (`| head`) ends it quietly.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "nsml", &mut script);
            crate::output::emit(&String::from_utf8_lossy(&script));
            Ok(())
        }
    }
}

/// Runs `nsml dataset …`.
async fn dispatch_dataset(ctx: &Context, command: DatasetCommand) -> Result<()> {
    match command {
        DatasetCommand::Ls { json } => boards::datasets(ctx, json.json).await,
        DatasetCommand::Board {
            dataset,
            private,
            json,
        } => boards::dataset_board(ctx, &dataset, private, json.json).await,
    }
}

/// Runs `nsml model …`.
async fn dispatch_model(ctx: &Context, command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Ls { json, session } => models::ls(ctx, &session, json.json).await,
        ModelCommand::Rm {
            session,
            checkpoint,
        } => models::rm(ctx, &session, &checkpoint).await,
        ModelCommand::Pull {
            session,
            checkpoint,
            path,
        } => models::pull(ctx, &session, &checkpoint, path).await,
    }
}

/// Runs `nsml admin …`.
async fn dispatch_admin(ctx: &Context, command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Competition(AdminCompetitionCommand::Apply { file }) => {
            admin::apply(ctx, &file).await
        }
        AdminCommand::Competition(AdminCompetitionCommand::Ls { json }) => {
            admin::competitions(ctx, json.json).await
        }
        AdminCommand::User(AdminUserCommand::Add {
            name,
            team,
            competition,
            password_stdin,
        }) => admin::add_user(ctx, name, team, competition, password_stdin).await,
        AdminCommand::Board(AdminBoardCommand::Reveal { competition }) => {
            admin::reveal(ctx, &competition).await
        }
        AdminCommand::Override(command) => dispatch_override(ctx, command).await,
        AdminCommand::Audit(command) => dispatch_audit(ctx, command).await,
    }
}

/// Runs `nsml admin override …`.
async fn dispatch_override(ctx: &Context, command: AdminOverrideCommand) -> Result<()> {
    match command {
        AdminOverrideCommand::Submit {
            team,
            dataset,
            reason,
            submission,
            competition,
        } => audit::extra_submit(ctx, team, dataset, reason, submission, competition).await,
        AdminOverrideCommand::ReopenSubmit {
            team,
            submission,
            reason,
            competition,
            json,
        } => audit::reopen_submit(ctx, team, submission, reason, competition, json.json).await,
        AdminOverrideCommand::Quota {
            team,
            gpus,
            cpus,
            memory,
            sessions,
            until,
            reason,
            competition,
        } => {
            let raise = nsml_proto::v1::QuotaRaise {
                gpus: gpus.unwrap_or(0),
                cpus: cpus.unwrap_or(0),
                memory_bytes: memory.unwrap_or(0),
                sessions: sessions.unwrap_or(0),
            };
            audit::raise_quota(ctx, team, raise, until, reason, competition).await
        }
        AdminOverrideCommand::Deadline {
            team,
            until,
            reason,
            round,
            competition,
        } => audit::extend_deadline(ctx, team, until, reason, round, competition).await,
    }
}

/// Runs `nsml admin audit …`.
async fn dispatch_audit(ctx: &Context, command: AdminAuditCommand) -> Result<()> {
    match command {
        AdminAuditCommand::Replay {
            competition,
            team,
            until,
            json,
        } => audit::replay(ctx, competition, team, until, json.json).await,
        AdminAuditCommand::Explain { id, json } => audit::explain(ctx, &id, json.json).await,
        AdminAuditCommand::Verify { json } => audit::verify(ctx, json.json).await,
        AdminAuditCommand::Export { team } => audit::export(ctx, &team).await,
    }
}

/// Reads a password: the first line of standard input with `--password-stdin`, else a prompt on the terminal.
pub fn read_password(from_stdin: bool, prompt: &str) -> Result<String> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        rpassword::prompt_password(prompt).map_err(|e| {
            anyhow::anyhow!("cannot prompt for a password ({e}); pass it with --password-stdin")
        })?
    };
    if password.is_empty() {
        anyhow::bail!(crate::UsageError("the password is empty".into()));
    }
    Ok(password)
}
