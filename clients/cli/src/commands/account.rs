//! `login`, `logout`, `whoami`.

use std::io::Write;

use anyhow::{Result, bail};
use nsml_proto::error::ErrorCode;
use nsml_proto::v1::{Empty, LoginRequest};

use super::{Context, read_password};
use crate::UsageError;
use crate::api::Api;
use crate::config::Credentials;
use crate::json;

pub async fn login(ctx: &Context, username: Option<String>, password_stdin: bool) -> Result<()> {
    let username = match username {
        Some(name) => name,
        None if password_stdin => {
            bail!(UsageError(
                "--password-stdin needs the user name: nsml login -u NAME --password-stdin".into()
            ))
        }
        None => prompt("Username: ")?,
    };
    if username.is_empty() {
        bail!(UsageError("the user name is empty".into()));
    }
    let password = read_password(password_stdin, "Password: ")?;
    // No token on the login call itself: a stale one must not get in the way.
    let api = Api::new(&ctx.target.server, None)?;
    let response = api
        .auth()
        .login(LoginRequest {
            username: username.clone(),
            password,
        })
        .await?
        .into_inner();
    let credentials = Credentials {
        server: ctx.target.server.clone(),
        username: if response.username.is_empty() {
            username
        } else {
            response.username
        },
        token: response.token,
    };
    ctx.store.save(&credentials)?;
    println!("Welcome to NSML!");
    Ok(())
}

fn prompt(text: &str) -> Result<String> {
    let mut stderr = std::io::stderr();
    write!(stderr, "{text}")?;
    stderr.flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

pub async fn logout(ctx: &Context) -> Result<()> {
    if ctx.target.token.is_none() {
        println!("Not logged in");
        return Ok(());
    }
    match ctx.api()?.auth().logout(Empty {}).await {
        Ok(_) => {}
        // Already expired or revoked: forgetting it locally is all that is left.
        Err(status) if ErrorCode::of_or_implied(&status) == ErrorCode::Unauthenticated => {}
        Err(status) => eprintln!(
            "Warning: the server did not revoke the token: {}",
            status.message()
        ),
    }
    ctx.store.remove()?;
    if std::env::var_os("NSML_TOKEN").is_some_and(|t| !t.is_empty()) {
        eprintln!("Note: NSML_TOKEN is still set in your environment");
    }
    println!("Logged out");
    Ok(())
}

pub async fn whoami(ctx: &Context, as_json: bool) -> Result<()> {
    let identity = ctx.api()?.auth().who_am_i(Empty {}).await?.into_inner();
    if as_json {
        json::print(&json::identity(&identity));
        return Ok(());
    }
    println!("Username: {}", identity.username);
    if identity.admin {
        println!("Admin:    yes");
    }
    let teams: Vec<String> = identity
        .memberships
        .iter()
        .map(|m| format!("{} (competition {})", m.team, m.competition))
        .collect();
    println!(
        "Teams:    {}",
        if teams.is_empty() {
            "-".to_string()
        } else {
            teams.join(", ")
        }
    );
    println!(
        "Hosts:    {}",
        if identity.hosts.is_empty() {
            "-".to_string()
        } else {
            identity.hosts.join(", ")
        }
    );
    Ok(())
}
