//! How things look on the terminal: aligned tables without colour, relative times, numbers and labels as NSML
//! printed them.
//!
//! Whatever the server sends was typed by someone, maybe another team: a memo, a reason, a name. Nothing of it
//! reaches the terminal raw. [`clean`] shows control characters and escape sequences as visible escapes, and
//! every table and server message goes through it; participants' log lines go through [`clean_log`], which
//! keeps their colours (training libraries print them, and they cannot do harm) but nothing else a terminal
//! would obey.

use std::io::Write;

use chrono::{Local, TimeZone};
use nsml_proto::v1::{Direction, Session, SessionKind, SessionStatus};
use serde_json::Value;

/// A plain-text table: a header row and left-aligned columns two spaces apart, no trailing spaces.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: AsRef<str>>(headers: &[S]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.as_ref().to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, line breaks inside a cell become spaces and other control
    /// characters are shown escaped (see [`clean`]).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| clean(&c.replace(['\r', '\n', '\t'], " ")))
                .collect(),
        );
    }

    /// Renders the table, one line per row, each ending with a newline.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Text from the server as the terminal may show it: every control character (escape, carriage return,
/// backspace, bell, C1 controls, …) is written as a visible escape such as `\u{1b}`, so a value can neither
/// move the cursor, rewrite what was printed, set the title nor reach the clipboard. Line feeds and tabs are
/// kept.
pub fn clean(text: &str) -> String {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A participant's log line as the terminal may show it: colour and style sequences (`ESC [ … m`) and tabs
/// are kept, a carriage return starts a new line (progress bars print one line per update rather than
/// overwriting what came before), and everything else [`clean`] escapes is escaped.
pub fn clean_log(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if c == '\u{1b}'
            && let Some(sgr) = sgr_prefix(rest)
        {
            out.push_str(sgr);
            rest = &rest[sgr.len()..];
            continue;
        }
        match c {
            '\r' => out.push('\n'),
            '\t' | '\n' => out.push(c),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The colour sequence `ESC [ digits and semicolons m` that `text` starts with, if it does.
fn sgr_prefix(text: &str) -> Option<&str> {
    let params = text.strip_prefix("\u{1b}[")?;
    let len = params
        .bytes()
        .take(32)
        .take_while(|b| b.is_ascii_digit() || *b == b';')
        .count();
    (params.as_bytes().get(len) == Some(&b'm')).then(|| &text[..2 + len + 1])
}

/// Writes to stdout; when the reader went away (`nsml logs -f x | head`), ends the program quietly instead of
/// failing, as `cat` would.
pub fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Returns the current time in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Formats a past instant relative to `now_ms`: `just now`, `42 seconds ago`, `3 minutes ago`, `1 hour ago`; `-`
/// for an unset time.
pub fn relative_time(at_ms: i64, now_ms: i64) -> String {
    if at_ms <= 0 {
        return "-".to_string();
    }
    let secs = (now_ms - at_ms).max(0) / 1000;
    let (n, unit) = match secs {
        0..10 => return "just now".to_string(),
        10..60 => (secs, "second"),
        60..3600 => (secs / 60, "minute"),
        3600..86_400 => (secs / 3600, "hour"),
        86_400..2_592_000 => (secs / 86_400, "day"),
        2_592_000..31_536_000 => (secs / 2_592_000, "month"),
        _ => (secs / 31_536_000, "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// Formats an instant as local `YYYY-MM-DD HH:MM:SS`; `-` for an unset time.
pub fn datetime(at_ms: i64) -> String {
    if at_ms <= 0 {
        return "-".to_string();
    }
    match Local.timestamp_millis_opt(at_ms).single() {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => "-".to_string(),
    }
}

/// Formats a number with `digits` significant digits, without trailing zeros or exponent: `2.871`, `0.9571`,
/// `12346`, `0.00001235`.
pub fn significant(value: f64, digits: i32) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    if value == 0.0 {
        return "0".to_string();
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).clamp(0, 17) as usize;
    let text = format!("{value:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// Formats a leaderboard score: six significant digits, enough to tell close scores apart.
pub fn score(value: f64) -> String {
    significant(value, 6)
}

/// Renders a summary (a JSON object of metrics) as `k=v, k=v`, floats to four significant digits; text that
/// is not a JSON object is shown as it is. Keys read as reported: Python keyword arguments cannot hold `/`,
/// so `nsml.report(train__loss=…)` is NSML's way to write `train/loss`, and it is shown so.
pub fn summary(json: &str) -> String {
    if json.trim().is_empty() {
        return String::new();
    }
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| format!("{}={}", metric_key(k), metric_value(v)))
            .collect::<Vec<_>>()
            .join(", "),
        Ok(other) => metric_value(&other),
        Err(_) => json.to_string(),
    }
}

/// A metric's name as its author meant it: `train__loss` is `train/loss`.
fn metric_key(key: &str) -> String {
    key.replace("__", "/")
}

fn metric_value(value: &Value) -> String {
    match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::Number(n) => n
            .as_f64()
            .map_or_else(|| n.to_string(), |f| significant(f, 4)),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Returns `Queued`, `Running`, `Stopping`, `Exited`, `Failed` or `Stopped`, with ` (exit N)` for a non-zero
/// exit code of an ended session.
pub fn session_status(session: &Session) -> String {
    let label = status_name(session.status());
    let ended = matches!(
        session.status(),
        SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
    );
    if ended && session.exit_code != 0 {
        format!("{label} (exit {})", session.exit_code)
    } else {
        label.to_string()
    }
}

pub fn status_name(status: SessionStatus) -> &'static str {
    match status {
        SessionStatus::Unspecified => "Unknown",
        SessionStatus::Queued => "Queued",
        SessionStatus::Running => "Running",
        SessionStatus::Stopping => "Stopping",
        SessionStatus::Exited => "Exited",
        SessionStatus::Failed => "Failed",
        SessionStatus::Stopped => "Stopped",
    }
}

/// Returns whether a session has ended.
pub fn session_ended(status: SessionStatus) -> bool {
    matches!(
        status,
        SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
    )
}

/// Returns `train`, `trial` or `submit`.
pub fn kind_name(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Unspecified => "unknown",
        SessionKind::Train => "train",
        SessionKind::TrialSubmit => "trial",
        SessionKind::Submit => "submit",
    }
}

/// Returns whether a session runs a submit (trial or real).
pub fn is_submit(kind: SessionKind) -> bool {
    matches!(kind, SessionKind::TrialSubmit | SessionKind::Submit)
}

/// Returns the metric as a leaderboard header names it: `Accuracy`, `Macro F1`, `MSE`, `CER`.
pub fn metric_label(metric: &str) -> String {
    match metric {
        "accuracy" => "Accuracy".to_string(),
        "macro_f1" => "Macro F1".to_string(),
        "mse" | "rmse" | "mae" | "cer" | "wer" => metric.to_ascii_uppercase(),
        other => {
            let mut chars = other.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => "-".to_string(),
            }
        }
    }
}

/// Returns `Descending` or `Ascending`.
pub fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::Descending => "Descending",
        Direction::Ascending => "Ascending",
        Direction::Unspecified => "-",
    }
}

/// Returns `-` for an empty cell, so columns stay readable.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut table = Table::new(&["Name", "Status", "Summary"]);
        table.row(vec!["demo/t1-cls/1".into(), "Running".into(), "".into()]);
        table.row(vec![
            "demo/t1-cls/12".into(),
            "Exited (exit 1)".into(),
            "loss=0.5".into(),
        ]);
        assert_eq!(
            table.render(),
            "Name            Status           Summary\n\
             demo/t1-cls/1   Running\n\
             demo/t1-cls/12  Exited (exit 1)  loss=0.5\n"
        );
    }

    #[test]
    fn server_text_never_reaches_the_terminal_raw() {
        let memo = "ok\u{1b}]52;c;cm0gLXJmIH4=\u{7}\u{1b}[2J\rfake\u{8}\u{9b}31m";
        let shown = clean(memo);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(
            shown,
            "ok\\u{1b}]52;c;cm0gLXJmIH4=\\u{7}\\u{1b}[2J\\rfake\\u{8}\\u{9b}31m"
        );
        let mut t = Table::new(&["MEMO"]);
        t.row(vec![memo.to_string()]);
        assert!(
            !t.render().chars().any(|c| c.is_control() && c != '\n'),
            "{:?}",
            t.render()
        );
        assert_eq!(clean("plain memo"), "plain memo");
    }

    #[test]
    fn log_lines_keep_their_colours_and_nothing_else() {
        assert_eq!(
            clean_log("\u{1b}[1;32mok\u{1b}[0m\tdone"),
            "\u{1b}[1;32mok\u{1b}[0m\tdone"
        );
        assert_eq!(
            clean_log("a\u{1b}[2J\u{1b}]0;title\u{7}b"),
            "a\\u{1b}[2J\\u{1b}]0;title\\u{7}b"
        );
        assert_eq!(clean_log("10%\r20%"), "10%\n20%");
        assert_eq!(
            clean_log("\u{1b}[31"),
            "\\u{1b}[31",
            "an unfinished sequence"
        );
    }

    #[test]
    fn tables_keep_one_line_per_row() {
        let mut table = Table::new(&["A", "B"]);
        table.row(vec!["x\ny".into()]);
        assert_eq!(table.render(), "A    B\nx y\n");
        assert_eq!(Table::new(&["Only"]).render(), "Only\n");
    }

    #[test]
    fn times_are_relative_like_nsml() {
        let now = 1_700_000_000_000;
        assert_eq!(relative_time(0, now), "-");
        assert_eq!(relative_time(now - 3_000, now), "just now");
        assert_eq!(relative_time(now + 5_000, now), "just now");
        assert_eq!(relative_time(now - 42_000, now), "42 seconds ago");
        assert_eq!(relative_time(now - 60_000, now), "1 minute ago");
        assert_eq!(
            relative_time(now - 7 * 60_000 - 59_000, now),
            "7 minutes ago"
        );
        assert_eq!(relative_time(now - 3_600_000, now), "1 hour ago");
        assert_eq!(relative_time(now - 3 * 86_400_000, now), "3 days ago");
        assert_eq!(relative_time(now - 400 * 86_400_000, now), "1 year ago");
    }

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(significant(2.87123, 4), "2.871");
        assert_eq!(significant(0.957123, 4), "0.9571");
        assert_eq!(significant(6.0, 4), "6");
        assert_eq!(significant(12345.678, 4), "12346");
        assert_eq!(significant(-0.5, 4), "-0.5");
        assert_eq!(significant(0.0000123456, 4), "0.00001235");
        assert_eq!(significant(0.0, 4), "0");
        assert_eq!(score(0.8333333333), "0.833333");
        assert_eq!(score(1.0), "1");
    }

    #[test]
    fn summaries_render_as_key_value_pairs() {
        assert_eq!(
            summary(r#"{"epoch":0,"train_loss":2.87123,"val_cer":0.957123}"#),
            "epoch=0, train_loss=2.871, val_cer=0.9571"
        );
        assert_eq!(
            summary(r#"{"note":"ok","best":true}"#),
            "best=true, note=ok"
        );
        assert_eq!(summary(""), "");
        assert_eq!(summary("not json"), "not json");
        // As reported: `nsml.report(train__loss=…)` is `train/loss`.
        assert_eq!(
            summary(r#"{"epoch":1,"train__loss":0.4902,"val__acc":0.8667}"#),
            "epoch=1, train/loss=0.4902, val/acc=0.8667"
        );
    }

    #[test]
    fn statuses_show_non_zero_exit_codes() {
        let mut session = Session {
            status: SessionStatus::Exited as i32,
            ..Default::default()
        };
        assert_eq!(session_status(&session), "Exited");
        session.exit_code = 137;
        session.status = SessionStatus::Failed as i32;
        assert_eq!(session_status(&session), "Failed (exit 137)");
        session.status = SessionStatus::Running as i32;
        assert_eq!(session_status(&session), "Running");
    }

    #[test]
    fn metrics_are_labelled_like_leaderboard_headers() {
        assert_eq!(metric_label("accuracy"), "Accuracy");
        assert_eq!(metric_label("mse"), "MSE");
        assert_eq!(metric_label("macro_f1"), "Macro F1");
        assert_eq!(metric_label("custom"), "Custom");
    }
}
