//! Names users type: datasets, teams, sessions (`TEAM/DATASET/N`) and checkpoints.

use crate::error::ErrorCode;
use tonic::Status;

use crate::bounds::shown;

/// A session name split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionName {
    pub team: String,
    pub dataset: String,
    pub number: u64,
}

impl SessionName {
    /// Parses `TEAM/DATASET/N`.
    pub fn parse(s: &str) -> Result<Self, Status> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || {
            ErrorCode::BadRequest.status(format!(
                "`{}` is not a session name: expected TEAM/DATASET/N, e.g. demo/t1-cls/3",
                shown(s)
            ))
        };
        if parts.len() != 3 || parts[0].is_empty() || parts[1].is_empty() {
            return Err(bad());
        }
        let number = parts[2].parse::<u64>().map_err(|_| bad())?;
        Ok(Self {
            team: parts[0].to_string(),
            dataset: parts[1].to_string(),
            number,
        })
    }

    /// The stream holding every session of this team on this dataset.
    pub fn stream(&self) -> String {
        sessions_stream(&self.team, &self.dataset)
    }
}

impl std::fmt::Display for SessionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.team, self.dataset, self.number)
    }
}

/// The stream of a team's sessions on a dataset.
pub fn sessions_stream(team: &str, dataset: &str) -> String {
    format!("sessions-{team}/{dataset}")
}

/// Checks a user-chosen identifier (team, dataset, user, competition).
pub fn check_ident(kind: &str, s: &str) -> Result<(), Status> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ErrorCode::BadRequest.status(format!(
            "invalid {kind} name `{}`: use 1-63 lowercase letters, digits, `-` or `_`, starting with a letter or digit",
            shown(s)
        )))
    }
}

/// Checks a checkpoint name (any string NSML allowed, minus path tricks).
pub fn check_checkpoint(s: &str) -> Result<(), Status> {
    if s.is_empty()
        || s.len() > 128
        || s.contains('/')
        || s.contains('\\')
        || s.contains('\0')
        || s == "."
        || s == ".."
        || s.chars().any(|c| c.is_control())
    {
        return Err(ErrorCode::BadRequest.status(format!(
            "invalid checkpoint name `{}`: 1-128 characters without `/`, `\\`, control characters, `.` or `..`",
            shown(s)
        )));
    }
    Ok(())
}

/// Matches a name against a pattern with `*` (any run) and `?` (one character).
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ni < n.len() {
        // `*` first: a `*` in the name is matched by the pattern's `*`, not taken as a literal `*`.
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_session_names() {
        let s = SessionName::parse("demo/t1-cls/3").unwrap();
        assert_eq!(
            (s.team.as_str(), s.dataset.as_str(), s.number),
            ("demo", "t1-cls", 3)
        );
        assert!(SessionName::parse("demo/t1-cls").is_err());
        assert!(SessionName::parse("demo/t1-cls/x").is_err());
        assert_eq!(s.to_string(), "demo/t1-cls/3");
    }

    #[test]
    fn wildcards_match_like_nsml_rm() {
        assert!(wildcard_match("me/kin/1*", "me/kin/12"));
        assert!(wildcard_match("me/kin/1?", "me/kin/12"));
        assert!(!wildcard_match("me/kin/1?", "me/kin/123"));
        assert!(!wildcard_match("me/kin/1*", "me/kin/21"));
        assert!(wildcard_match("*", "a/b/1"));
        assert!(wildcard_match("*", "*a"));
    }

    #[test]
    fn checkpoint_names_refuse_paths() {
        assert!(check_checkpoint("best").is_ok());
        assert!(check_checkpoint("3").is_ok());
        assert!(check_checkpoint("../x").is_err());
        assert!(check_checkpoint("").is_err());
        assert!(check_checkpoint("..").is_err());
    }

    #[test]
    fn refusals_quote_a_long_name_shortened() {
        let long = "x".repeat(1 << 20);
        for err in [
            SessionName::parse(&long).unwrap_err(),
            check_ident("team", &long).unwrap_err(),
            check_checkpoint(&long).unwrap_err(),
        ] {
            assert!(err.message().len() < 300, "{} bytes", err.message().len());
            assert!(err.message().contains("(1048576 bytes)"));
        }
    }
}
