//! What the benches share: percentiles, the wall clock in milliseconds, and the check that a bench session
//! ran to its end.

use std::time::{SystemTime, UNIX_EPOCH};

use nsml_proto::v1::{Session, SessionStatus};

/// The `p` quantile (0–1) of `v`, nearest rank; NaN for none.
pub fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// The wall clock in milliseconds since the epoch, as a participant's entry stamps it.
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Requires that a bench session exited normally: a figure over failed sessions would mean nothing.
pub fn exited(s: &Session) -> anyhow::Result<()> {
    anyhow::ensure!(
        s.status() == SessionStatus::Exited,
        "bench session {} ended as {:?}: {}",
        s.name,
        s.status(),
        s.reason
    );
    Ok(())
}
