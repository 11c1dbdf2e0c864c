//! `ps`, `logs`, `stop`, `rm`, `memo`, and following a session's output.

use anyhow::{Result, bail};
use nsml_proto::v1::{
    GetSessionRequest, ListSessionsRequest, LogsRequest, MemoRequest, RemoveRequest, Session,
    SessionStatus, StopRequest,
};

use super::Context;
use crate::api::Api;
use crate::cli::PsArgs;
use crate::output::{
    Table, clean_log, emit, is_submit, kind_name, now_ms, relative_time, session_ended,
    session_status, status_name, summary,
};
use crate::retry;
use crate::{Exit, json};
use nsml_manifest::format_size;

/// The arguments the platform passes to the entry file of a submit session.
pub const SUBMIT_ARGS: &str = "--mode test --pause 1";

pub async fn ps(ctx: &Context, args: PsArgs) -> Result<()> {
    let response = ctx
        .api()?
        .session()
        .list(ListSessionsRequest {
            all: args.all,
            last: args.last.unwrap_or(0),
            dataset: args.dataset.unwrap_or_default(),
            search: args.search.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if args.json.json {
        json::print(&response.sessions.iter().map(json::session).collect());
        return Ok(());
    }
    emit(&render_ps(&response.sessions, now_ms()));
    Ok(())
}

/// Renders `nsml ps`: the table, then why each failed or stopped session ended.
pub fn render_ps(sessions: &[Session], now: i64) -> String {
    let mut table = Table::new(&[
        "Name",
        "Created",
        "Args",
        "Status",
        "Summary",
        "Description",
        "# of Models",
        "Size",
        "Type",
    ]);
    for s in sessions {
        let submit = is_submit(s.kind());
        table.row(vec![
            s.name.clone(),
            relative_time(s.created_at_ms, now),
            if submit && s.args.is_empty() {
                SUBMIT_ARGS.to_string()
            } else {
                s.args.clone()
            },
            session_status(s),
            summary(&s.summary_json),
            if submit {
                format!("submit of {}", s.source_session)
            } else {
                s.memo.clone()
            },
            s.checkpoint_count.to_string(),
            format_size(s.checkpoint_bytes),
            kind_name(s.kind()).to_string(),
        ]);
    }
    let mut out = table.render();
    let reasons: Vec<String> = sessions
        .iter()
        .filter(|s| {
            !s.reason.is_empty()
                && matches!(
                    s.status(),
                    SessionStatus::Queued | SessionStatus::Failed | SessionStatus::Stopped
                )
        })
        .map(|s| {
            format!(
                "{} {}: {}",
                s.name,
                status_name(s.status()).to_ascii_lowercase(),
                s.reason
            )
        })
        .collect();
    if !reasons.is_empty() {
        out.push('\n');
        for line in reasons {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

pub async fn logs(ctx: &Context, session: &str, follow: bool) -> Result<()> {
    let api = ctx.api()?;
    if follow {
        // A queued session has no log yet: say why it waits rather than print nothing.
        let s = api
            .session()
            .get(GetSessionRequest {
                name: session.to_string(),
            })
            .await?
            .into_inner();
        if s.status() == SessionStatus::Queued {
            let why = if s.reason.is_empty() {
                "waiting to be placed".to_string()
            } else {
                clean_log(&s.reason)
            };
            eprintln!("Session {session} is queued: {why}. Its log follows once it runs.");
        }
    }
    print_logs(&api, session, follow).await
}

/// Prints a session's log lines as they arrive, stderr lines on stderr; with `follow`, until the session ends.
pub async fn print_logs(api: &Api, session: &str, follow: bool) -> Result<()> {
    let request = LogsRequest {
        name: session.to_string(),
        follow,
    };
    // Through an outage the log is opened again and the lines already printed (by sequence number) skipped.
    let mut retry = retry::Retry::new("the log");
    let mut printed = 0u64;
    'open: loop {
        let mut stream = match api.session().logs(request.clone()).await {
            Ok(response) => response.into_inner(),
            Err(status) if retry.again(&status, retry::is_unavailable).await => continue,
            Err(status) => return Err(status.into()),
        };
        loop {
            match stream.message().await {
                Ok(Some(line)) => {
                    retry.reset();
                    if line.seq != 0 && line.seq <= printed {
                        continue;
                    }
                    printed = printed.max(line.seq);
                    let text = clean_log(line.text.strip_suffix('\n').unwrap_or(&line.text));
                    if line.stream == "stderr" {
                        eprintln!("{text}");
                    } else {
                        emit(&format!("{text}\n"));
                    }
                }
                Ok(None) => return Ok(()),
                Err(status) if retry.again(&status, retry::is_unavailable).await => continue 'open,
                Err(status) => return Err(status.into()),
            }
        }
    }
}

pub async fn stop(ctx: &Context, session: &str) -> Result<()> {
    let stopped = ctx
        .api()?
        .session()
        .stop(StopRequest {
            name: session.to_string(),
        })
        .await?
        .into_inner();
    if session_ended(stopped.status()) {
        println!(
            "Session {} is {}",
            stopped.name,
            session_status(&stopped).to_ascii_lowercase()
        );
    } else {
        println!("Session {} is stopping", stopped.name);
    }
    Ok(())
}

pub async fn rm(ctx: &Context, patterns: &[String], force: bool) -> Result<()> {
    let api = ctx.api()?;
    let mut failed = false;
    for pattern in patterns {
        match api
            .session()
            .remove(RemoveRequest {
                pattern: pattern.clone(),
                force,
            })
            .await
        {
            Ok(response) => {
                let response = response.into_inner();
                let removed = response.removed;
                if removed.is_empty() {
                    eprintln!("No session matches {pattern}");
                    failed = true;
                }
                for kept in &response.kept {
                    println!(
                        "Kept checkpoint {kept} (and its code): it backs your team's best score on a board, \
                         and the competition keeps what produced a board entry for reproducibility"
                    );
                }
                for name in removed {
                    println!("Removed {name}");
                }
            }
            // One refused pattern (a running session without -f) must not keep the others from going.
            Err(status) if patterns.len() > 1 && !crate::api::is_local(&status) => {
                eprintln!("Error: {pattern}: {}", status.message());
                failed = true;
            }
            Err(status) => return Err(status.into()),
        }
    }
    if failed {
        bail!(Exit(1));
    }
    Ok(())
}

pub async fn memo(ctx: &Context, session: &str, text: &str) -> Result<()> {
    let updated = ctx
        .api()?
        .session()
        .memo(MemoRequest {
            name: session.to_string(),
            memo: text.to_string(),
        })
        .await?
        .into_inner();
    println!("Memo of {} updated", updated.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use nsml_proto::v1::SessionKind;

    use super::*;

    #[test]
    fn ps_shows_submits_like_nsml_and_explains_failures() {
        let now = 1_700_000_000_000;
        let sessions = vec![
            Session {
                name: "demo/t1-cls/1".into(),
                kind: SessionKind::Train as i32,
                status: SessionStatus::Running as i32,
                created_at_ms: now - 180_000,
                args: "--epochs 3".into(),
                memo: "baseline".into(),
                summary_json: r#"{"epoch":2,"loss":0.123456}"#.into(),
                checkpoint_count: 2,
                checkpoint_bytes: 1229,
                ..Default::default()
            },
            Session {
                name: "demo/t1-cls/2".into(),
                kind: SessionKind::Submit as i32,
                status: SessionStatus::Failed as i32,
                exit_code: 137,
                reason: "Killed (out of memory: limit 24G)".into(),
                created_at_ms: now - 60_000,
                source_session: "demo/t1-cls/1".into(),
                ..Default::default()
            },
        ];
        let expected = [
            "Name           Created        Args                   Status             Summary               \
             Description              # of Models  Size    Type",
            "demo/t1-cls/1  3 minutes ago  --epochs 3             Running            epoch=2, loss=0.1235  \
             baseline                 2            1.2 KB  train",
            "demo/t1-cls/2  1 minute ago   --mode test --pause 1  Failed (exit 137)                        \
             submit of demo/t1-cls/1  0            0 B     submit",
            "",
            "demo/t1-cls/2 failed: Killed (out of memory: limit 24G)",
            "",
        ];
        assert_eq!(render_ps(&sessions, now), expected.join("\n"));
    }

    #[test]
    fn ps_says_why_a_queued_session_waits() {
        let now = 1_700_000_000_000;
        let sessions = vec![Session {
            name: "demo/t1-cls/3".into(),
            kind: SessionKind::Train as i32,
            status: SessionStatus::Queued as i32,
            reason: "Queued in Slurm (Resources): no node has the GPUs, CPUs or memory it asks for free yet"
                .into(),
            created_at_ms: now - 5_000,
            ..Default::default()
        }];
        let out = render_ps(&sessions, now);
        assert!(
            out.ends_with(
                "\ndemo/t1-cls/3 queued: Queued in Slurm (Resources): no node has the GPUs, CPUs or memory it asks for free yet\n"
            ),
            "{out}"
        );
    }
}
