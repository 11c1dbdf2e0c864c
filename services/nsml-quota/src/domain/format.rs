//! How the ledger's facts read to people: memory, times, intervals, resources and overrides. Every client shows
//! these renderings, and refusals' reasons are built from them, so they change only with the refusals.

use nsml_proto::v1::{Override, OverrideKind, Resources};

/// Formats bytes as NSML showed memory (`24G`, `512M`). Not `nsml_manifest::short_size`: recorded decisions'
/// reasons hold this rendering and `audit replay` compares them word for word, so it stays as the log has it.
pub fn gib(b: impl Into<u128>) -> String {
    const G: u128 = 1024 * 1024 * 1024;
    const M: u128 = 1024 * 1024;
    // Wide, so a sum of memory and shared memory formats as what it is.
    let b: u128 = b.into();
    if b.is_multiple_of(G) {
        format!("{}G", b / G)
    } else if b >= G {
        format!("{:.1}G", b as f64 / G as f64)
    } else {
        format!("{}M", b.div_ceil(M))
    }
}

/// Formats a recorded time as RFC 3339 UTC, seconds precision.
pub fn fmt_time(ms: i64) -> String {
    use chrono::{Datelike, Timelike};
    // Field by field rather than through a format string: replay formats a time for every refusal it re-derives.
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => format!("{ms} ms after the epoch"),
    }
}

/// Says a number of seconds as NSML's rules did (`1 hour`, `10 minutes`).
pub fn human_secs(s: u64) -> String {
    if s.is_multiple_of(3600) {
        format!("{} hour{}", s / 3600, if s == 3600 { "" } else { "s" })
    } else if s.is_multiple_of(60) {
        format!("{} minutes", s / 60)
    } else {
        format!("{s} seconds")
    }
}

/// Resources in words, as the audit shows them.
pub fn describe(r: &Resources) -> String {
    format!(
        "{} GPUs, {} CPUs, {} memory + {} shared memory",
        r.gpus,
        r.cpus,
        gib(r.memory_bytes),
        gib(r.shm_bytes)
    )
}

/// An override in words: the one rendering every client shows.
pub fn describe_override(o: &Override) -> String {
    let what = match o.kind() {
        OverrideKind::ExtraSubmit => {
            let mut s = format!("an extra submit on `{}`", o.dataset);
            if !o.submission_id.is_empty() {
                s.push_str(&format!(" re-opening submission {}", o.submission_id));
            }
            if !o.used_by.is_empty() {
                s.push_str(&format!(", in use by submission {}", o.used_by));
            }
            s
        }
        OverrideKind::RaiseQuota => {
            let r = o.raise.unwrap_or_default();
            let mut parts = Vec::new();
            if r.gpus > 0 {
                parts.push(format!("{} GPUs", r.gpus));
            }
            if r.cpus > 0 {
                parts.push(format!("{} CPUs", r.cpus));
            }
            if r.memory_bytes > 0 {
                parts.push(format!("{} memory", gib(r.memory_bytes)));
            }
            if r.sessions > 0 {
                parts.push(format!("{} sessions", r.sessions));
            }
            format!(
                "limits raised to {} until {}",
                parts.join(", "),
                fmt_time(o.until_ms)
            )
        }
        OverrideKind::ReopenSubmit => format!(
            "re-opened the slot of submit {} on `{}`",
            o.submission_id, o.dataset
        ),
        OverrideKind::ExtendDeadline if o.round.is_empty() => {
            format!("the team's deadline extended to {}", fmt_time(o.until_ms))
        }
        OverrideKind::ExtendDeadline => format!(
            "the team's deadline for round `{}` extended to {}",
            o.round,
            fmt_time(o.until_ms)
        ),
        OverrideKind::Unspecified => "an override of unknown kind".into(),
    };
    format!(
        "override {}: {what}, granted by {} at {} ({})",
        o.id,
        o.granted_by,
        fmt_time(o.granted_at_ms),
        o.reason
    )
}
