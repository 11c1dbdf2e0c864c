//! `admin competition apply|ls`, `admin user add`, `admin board reveal`: host and administrator commands.

use std::path::Path;

use anyhow::Result;
use nsml_manifest::format_size;
use nsml_proto::v1::{AddUserRequest, Empty, RevealPrivateRequest};

use super::{Context, read_password};
use crate::json;
use crate::output::{Table, datetime, emit, metric_label};

pub async fn apply(ctx: &Context, file: &Path) -> Result<()> {
    let manifest = nsml_manifest::load(file)?;
    let api = ctx.api()?;
    println!(
        "Applying competition {} ({} datasets) from {}",
        manifest.id(),
        manifest.datasets().len(),
        file.display()
    );
    for warning in manifest.warnings() {
        eprintln!("Warning: {warning}");
    }
    let competition =
        nsml_manifest::apply(api.channel(), api.token().unwrap_or(""), &manifest).await?;
    let policy = competition.policy.unwrap_or_default();
    println!(
        "Competition {} ({}) applied, policy version {}",
        competition.id, competition.title, competition.policy_version
    );
    println!(
        "Policy: {} GPUs, {} CPUs, {} memory, {} sessions, {} storage per team; a real submit every {}s, \
         within {}s, on at most {} CPUs",
        policy.team_gpus,
        policy.team_cpus,
        format_size(policy.team_memory_bytes),
        policy.team_sessions,
        format_size(policy.team_storage_bytes),
        policy.submit_interval_secs,
        policy.submit_time_limit_secs,
        policy.submit_max_cpus
    );
    if !policy.rounds.is_empty() {
        println!("Rounds: {}", policy.rounds.len());
        for r in &policy.rounds {
            println!(
                "  {}: {} (opens {}, closes {})",
                r.name,
                r.datasets.join(", "),
                datetime(r.opens_at_ms),
                datetime(r.closes_at_ms)
            );
        }
    }
    println!("Datasets registered: {}", manifest.datasets().len());
    for d in manifest.datasets() {
        println!("  {} ({})", d.name, metric_label(&d.metric));
    }
    println!("Teams: {}", manifest.teams().len());
    for t in manifest.teams() {
        println!("  {}: {}", t.name, t.members.join(", "));
    }
    let users: Vec<&str> = manifest.users().iter().map(|u| u.name.as_str()).collect();
    println!("Users: {}", users.len());
    if !users.is_empty() {
        println!("  {}", users.join(", "));
    }
    Ok(())
}

pub async fn competitions(ctx: &Context, as_json: bool) -> Result<()> {
    let response = ctx
        .api()?
        .auth()
        .list_competitions(Empty {})
        .await?
        .into_inner();
    if as_json {
        json::print(
            &response
                .competitions
                .iter()
                .map(json::competition)
                .collect(),
        );
        return Ok(());
    }
    let mut table = Table::new(&[
        "Competition",
        "Title",
        "Datasets",
        "Teams",
        "Hosts",
        "Private",
    ]);
    for c in &response.competitions {
        table.row(vec![
            c.id.clone(),
            c.title.clone(),
            c.datasets
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            c.teams.len().to_string(),
            c.hosts.join(", "),
            if c.private_revealed {
                "revealed"
            } else {
                "hidden"
            }
            .to_string(),
        ]);
    }
    emit(&table.render());
    Ok(())
}

pub async fn add_user(
    ctx: &Context,
    name: String,
    team: String,
    competition: Option<String>,
    password_stdin: bool,
) -> Result<()> {
    let password = read_password(password_stdin, &format!("Password for {name}: "))?;
    ctx.api()?
        .auth()
        .add_user(AddUserRequest {
            username: name.clone(),
            password,
            team: team.clone(),
            competition: competition.clone().unwrap_or_default(),
        })
        .await?;
    match competition {
        Some(c) => println!("Added user {name} to team {team} in competition {c}"),
        None => println!("Added user {name} to team {team}"),
    }
    Ok(())
}

pub async fn reveal(ctx: &Context, competition: &str) -> Result<()> {
    let revealed = ctx
        .api()?
        .auth()
        .reveal_private(RevealPrivateRequest {
            competition: competition.to_string(),
        })
        .await?
        .into_inner();
    println!("Private leaderboard of {} revealed", revealed.id);
    Ok(())
}
