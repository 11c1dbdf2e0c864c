//! `dataset ls`, `dataset board`, `board` (the overall ranking) and `history`.

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use nsml_proto::v1::{
    BoardRequest, BoardResponse, Empty, HistoryRequest, ListDatasetsRequest, OverallRequest,
    OverallResponse,
};

use super::Context;
use crate::UsageError;
use crate::json;
use crate::output::{
    Table, datetime, direction_label, emit, metric_label, now_ms, or_dash, relative_time, score,
    significant,
};
use nsml_manifest::format_size;

pub async fn datasets(ctx: &Context, as_json: bool) -> Result<()> {
    let response = ctx
        .api()?
        .storage()
        .list_datasets(ListDatasetsRequest::default())
        .await?
        .into_inner();
    if as_json {
        json::print(&response.datasets.iter().map(json::dataset).collect());
        return Ok(());
    }
    let now = now_ms();
    let mut table = Table::new(&[
        "Name",
        "Size",
        "Last Modified",
        "Author",
        "Description",
        "Tag",
        "Metric",
    ]);
    for d in &response.datasets {
        let meta = d.meta.clone().unwrap_or_default();
        table.row(vec![
            meta.name.clone(),
            format_size(d.size_bytes),
            relative_time(d.updated_at_ms, now),
            or_dash(&d.author),
            or_dash(&meta.description),
            or_dash(&meta.tag),
            format!(
                "{} · {}",
                metric_label(&meta.metric),
                direction_label(meta.direction())
            ),
        ]);
    }
    emit(&table.render());
    Ok(())
}

pub async fn dataset_board(
    ctx: &Context,
    dataset: &str,
    private: bool,
    as_json: bool,
) -> Result<()> {
    let board = ctx
        .api()?
        .leaderboard()
        .board(BoardRequest {
            dataset: dataset.to_string(),
            private,
        })
        .await?
        .into_inner();
    if as_json {
        json::print(&json::board(&board));
        return Ok(());
    }
    emit(&render_board(&board));
    Ok(())
}

/// Renders a dataset's leaderboard: a header naming the metric and direction, then one row per team.
pub fn render_board(board: &BoardResponse) -> String {
    let mut out = format!(
        "{} · {} · {}{}\n",
        board.dataset,
        metric_label(&board.metric),
        direction_label(board.direction()),
        if board.private { " · Private" } else { "" }
    );
    let mut table = Table::new(&["Rank", "Team", "Score", "Model", "Count", "Last Submit"]);
    for row in &board.rows {
        table.row(vec![
            row.rank.to_string(),
            row.team.clone(),
            score(row.score),
            row.model.clone(),
            row.count.to_string(),
            datetime(row.last_submit_ms),
        ]);
    }
    out.push_str(&table.render());
    out
}

pub async fn overall(
    ctx: &Context,
    competition: Option<String>,
    private: bool,
    as_json: bool,
) -> Result<()> {
    let api = ctx.api()?;
    let competition = match competition {
        Some(c) => c,
        None => {
            let identity = api.auth().who_am_i(Empty {}).await?.into_inner();
            let mine: BTreeSet<String> = identity
                .memberships
                .iter()
                .map(|m| m.competition.clone())
                .chain(identity.hosts.iter().cloned())
                .collect();
            if mine.len() == 1 {
                mine.into_iter().next().unwrap_or_default()
            } else {
                let all = api.auth().list_competitions(Empty {}).await?.into_inner();
                let mut table = Table::new(&["Competition", "Title"]);
                for c in &all.competitions {
                    if mine.is_empty() || mine.contains(&c.id) {
                        table.row(vec![c.id.clone(), c.title.clone()]);
                    }
                }
                eprint!("{}", table.render());
                bail!(UsageError(
                    "name the competition: nsml board COMPETITION".into()
                ));
            }
        }
    };
    let response = api
        .leaderboard()
        .overall(OverallRequest {
            competition,
            private,
        })
        .await?
        .into_inner();
    if as_json {
        json::print(&json::overall(&response));
        return Ok(());
    }
    emit(&render_overall(&response));
    Ok(())
}

/// Renders the overall ranking: the mean of each team's ranks, and the rank on every dataset.
pub fn render_overall(overall: &OverallResponse) -> String {
    let mut out = format!(
        "{} · Overall{}\n",
        overall.competition,
        if overall.private { " · Private" } else { "" }
    );
    let mut headers = vec![
        "Rank".to_string(),
        "Team".to_string(),
        "Mean rank".to_string(),
    ];
    headers.extend(overall.datasets.iter().cloned());
    let mut table = Table::new(&headers);
    for row in &overall.rows {
        let mut cells = vec![
            row.rank.to_string(),
            row.team.clone(),
            significant(row.mean_rank, 4),
        ];
        cells.extend((0..overall.datasets.len()).map(|i| {
            match (row.ranks.get(i), row.submitted.get(i)) {
                // Counted as the last rank in the mean, but the team has no score there.
                (Some(rank), Some(false)) => format!("no submission ({rank})"),
                (Some(rank), _) if *rank > 0 => rank.to_string(),
                _ => "-".to_string(),
            }
        }));
        table.row(cells);
    }
    out.push_str(&table.render());
    if !overall.rows.is_empty() {
        out.push_str(&format!(
            "Mean rank: a team's ranks averaged over the {} datasets; a dataset it has no submission on counts \
             as the last rank ({}, the number of teams ranked).\n",
            overall.datasets.len(),
            overall.rows.len()
        ));
    }
    out
}

pub async fn history(ctx: &Context, dataset: Option<String>, as_json: bool) -> Result<()> {
    let response = ctx
        .api()?
        .leaderboard()
        .history(HistoryRequest {
            dataset: dataset.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if as_json {
        json::print(&response.entries.iter().map(json::history_entry).collect());
        return Ok(());
    }
    let mut table = Table::new(&[
        "Submitted",
        "Team",
        "Dataset",
        "Model",
        "Score",
        "Private score",
    ]);
    for e in &response.entries {
        table.row(vec![
            datetime(e.at_ms),
            e.team.clone(),
            e.dataset.clone(),
            e.model.clone(),
            score(e.score),
            e.private_score.map_or_else(|| "-".to_string(), score),
        ]);
    }
    emit(&table.render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use nsml_proto::v1::{BoardRow, Direction, OverallRow};

    use super::*;

    #[test]
    fn dataset_boards_name_metric_and_direction() {
        let board = BoardResponse {
            dataset: "t1-cls".into(),
            competition: "demo".into(),
            metric: "accuracy".into(),
            direction: Direction::Descending as i32,
            private: false,
            rows: vec![
                BoardRow {
                    rank: 1,
                    team: "demo".into(),
                    score: 0.855,
                    model: "demo/t1-cls/3/best".into(),
                    count: 4,
                    last_submit_ms: 0,
                    best_at_ms: 0,
                },
                BoardRow {
                    rank: 2,
                    team: "rivals".into(),
                    score: 0.8,
                    model: "rivals/t1-cls/1/e9".into(),
                    count: 1,
                    last_submit_ms: 0,
                    best_at_ms: 0,
                },
            ],
        };
        assert_eq!(
            render_board(&board),
            "t1-cls · Accuracy · Descending\n\
             Rank  Team    Score  Model               Count  Last Submit\n\
             1     demo    0.855  demo/t1-cls/3/best  4      -\n\
             2     rivals  0.8    rivals/t1-cls/1/e9  1      -\n"
        );
    }

    #[test]
    fn the_overall_board_has_a_column_per_dataset() {
        let overall = OverallResponse {
            competition: "demo".into(),
            datasets: vec!["t1-cls".into(), "t2-reg".into()],
            private: true,
            rows: vec![
                OverallRow {
                    rank: 1,
                    team: "demo".into(),
                    mean_rank: 1.5,
                    ranks: vec![1, 2],
                    submitted: vec![true, true],
                },
                OverallRow {
                    rank: 2,
                    team: "rivals".into(),
                    mean_rank: 2.0,
                    ranks: vec![2, 2],
                    submitted: vec![true, false],
                },
            ],
        };
        assert_eq!(
            render_overall(&overall),
            "demo · Overall · Private\n\
             Rank  Team    Mean rank  t1-cls  t2-reg\n\
             1     demo    1.5        1       2\n\
             2     rivals  2          2       no submission (2)\n\
             Mean rank: a team's ranks averaged over the 2 datasets; a dataset it has no submission on counts \
             as the last rank (2, the number of teams ranked).\n"
        );
    }
}
