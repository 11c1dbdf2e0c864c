//! `nsml`: the command-line client of the NSML platform.
//!
//! Every command resolves the server and token (see [`config`]), talks gRPC to the gateway through [`api`],
//! prints tables or JSON (see [`output`] and [`json`]) and exits 0 on success, 1 when the server refused or
//! something failed, 2 on usage errors.

mod api;
mod archive;
mod cli;
mod commands;
mod config;
mod ignore;
mod json;
mod known_code;
mod output;
mod retry;
mod trace;

use std::fmt;
use std::process::ExitCode;

use nsml_proto::error::ErrorCode;

use crate::cli::{Cli, Command};
use crate::commands::Context;
use crate::config::CredentialStore;

/// A mistake in how the command was called, found after parsing (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A failure the command already explained to the user; only the exit code is left to give.
#[derive(Debug)]
pub struct Exit(pub u8);

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for Exit {}

fn main() -> ExitCode {
    // Parsed through the matches, which also name the subcommand the trace is named after.
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let name = matches.subcommand_name().unwrap_or("nsml").to_string();
    // One thread: a command is a few calls in a row, and the thread that reads an answer goes on with it
    // rather than waking another (no worker threads to start, hand work to, or join at exit).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("Error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let context = match context(cli.server, &cli.command) {
        Ok(context) => context,
        Err(e) => return report(&e, config::DEFAULT_SERVER),
    };
    let server = context.target.server.clone();
    let result = runtime.block_on(async {
        let trace = trace::start(&name);
        let result = commands::dispatch(&context, cli.command).await;
        if let Some(trace) = trace {
            trace.finish(result.as_ref().err().map(describe)).await;
        }
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e, &server),
    }
}

fn context(server_flag: Option<String>, command: &Command) -> anyhow::Result<Context> {
    let store = CredentialStore::from_env()?;
    let stored = match store.load() {
        Ok(stored) => stored,
        // A damaged credentials file must not keep anyone from logging in again or out.
        Err(_) if matches!(command, Command::Login { .. } | Command::Logout) => None,
        Err(e) => return Err(e),
    };
    let target = config::resolve(
        server_flag,
        config::env("NSML_SERVER"),
        config::env("NSML_TOKEN"),
        stored.as_ref(),
    );
    Ok(Context { store, target })
}

/// Prints why the command failed and returns its exit code.
fn report(err: &anyhow::Error, server: &str) -> ExitCode {
    for cause in err.chain() {
        if let Some(Exit(code)) = cause.downcast_ref::<Exit>() {
            return ExitCode::from(*code);
        }
        if let Some(usage) = cause.downcast_ref::<UsageError>() {
            eprintln!("Error: {usage}");
            return ExitCode::from(2);
        }
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            report_status(err, status, server);
            return ExitCode::FAILURE;
        }
    }
    eprintln!("Error: {}", output::clean(&describe(err)));
    ExitCode::FAILURE
}

/// Joins the error's chain of causes, skipping a cause whose text the message already holds (errors that
/// print their source as well as expose it).
fn describe(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

fn report_status(err: &anyhow::Error, status: &tonic::Status, server: &str) {
    let code = ErrorCode::of_or_implied(status);
    if api::is_local(status) && code == ErrorCode::Unavailable {
        eprintln!("Error: cannot reach the NSML server at {server} (is nsmld running?)");
        return;
    }
    let message = output::clean(&status_message(err, status));
    eprintln!("Error: {message}");
    // The hint, unless the message gave it already.
    if code == ErrorCode::Unauthenticated && !message.contains("nsml login") {
        eprintln!("Log in with `nsml login` (or set NSML_TOKEN).");
    }
}

/// Returns the server's message, after whatever context the client added (`registering dataset `x``).
fn status_message(err: &anyhow::Error, status: &tonic::Status) -> String {
    let message = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    let context: Vec<String> = err
        .chain()
        .take_while(|cause| !cause.is::<tonic::Status>())
        .map(ToString::to_string)
        .collect();
    let context = context.join(": ");
    if context.is_empty() {
        message
    } else if context.ends_with(&message) {
        context
    } else {
        format!("{context}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn status_messages_keep_the_client_context_once() {
        let status = tonic::Status::failed_precondition("next submit allowed at 12:00");
        let err = anyhow::Error::from(status);
        let status = err.downcast_ref::<tonic::Status>().unwrap();
        assert_eq!(status_message(&err, status), "next submit allowed at 12:00");

        let err = Err::<(), _>(tonic::Status::not_found("no session `a/b/1`"))
            .context("removing a/b/1")
            .unwrap_err();
        let status = err
            .chain()
            .find_map(|c| c.downcast_ref::<tonic::Status>())
            .unwrap();
        assert_eq!(
            status_message(&err, status),
            "removing a/b/1: no session `a/b/1`"
        );

        let err = anyhow::Error::from(nsml_manifest::ManifestError::Rpc {
            action: "registering dataset `d`".into(),
            source: tonic::Status::permission_denied("hosts only"),
        });
        let status = err
            .chain()
            .find_map(|c| c.downcast_ref::<tonic::Status>())
            .unwrap();
        assert_eq!(
            status_message(&err, status),
            "registering dataset `d`: hosts only"
        );
    }

    #[test]
    fn causes_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::from(io).context("cannot read x.toml: no such file");
        assert_eq!(describe(&err), "cannot read x.toml: no such file");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::from(io).context("cannot read x.toml");
        assert_eq!(describe(&err), "cannot read x.toml: no such file");
    }

    #[test]
    fn exit_codes_follow_the_kind_of_failure() {
        let code = |e: anyhow::Error| format!("{:?}", report(&e, "http://x"));
        assert_eq!(code(Exit(3).into()), format!("{:?}", ExitCode::from(3)));
        assert_eq!(
            code(UsageError("bad".into()).into()),
            format!("{:?}", ExitCode::from(2))
        );
        assert_eq!(
            code(tonic::Status::internal("boom").into()),
            format!("{:?}", ExitCode::FAILURE)
        );
        assert_eq!(
            code(anyhow::anyhow!("plain")),
            format!("{:?}", ExitCode::FAILURE)
        );
    }
}
