//! `.nsmlignore`: which files an upload of a directory leaves out.
//!
//! The syntax is a subset of `.gitignore`: one glob pattern per line; blank lines and lines starting with `#` are
//! skipped (`\#` for a literal `#`); `!` re-includes what an earlier pattern excluded; a trailing `/` matches
//! directories only; a pattern with a `/` elsewhere is relative to the uploaded directory, one without matches a
//! name at any depth; `*` and `?` stay within one path component and `**` crosses them. An excluded directory is
//! not descended into, so nothing below it can be re-included. `.git` is always left out.

use globset::{GlobBuilder, GlobMatcher};

use crate::error::ArchiveError;

#[derive(Debug, Clone)]
struct Rule {
    matcher: GlobMatcher,
    negate: bool,
    dir_only: bool,
    /// Matched against the whole relative path rather than the file name.
    anchored: bool,
}

/// The parsed patterns of one `.nsmlignore`.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<Rule>,
}

impl IgnoreRules {
    /// Parses the text of a `.nsmlignore`; an invalid pattern is an error naming its line.
    pub fn parse(text: &str) -> Result<Self, ArchiveError> {
        let mut rules = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let mut line = line.trim_end();
            if line.trim_start().is_empty() || line.starts_with('#') {
                continue;
            }
            let negate = line.starts_with('!');
            if negate {
                line = &line[1..];
            }
            if line.starts_with("\\#") || line.starts_with("\\!") {
                line = &line[1..];
            }
            let dir_only = line.ends_with('/');
            let line = line.trim_end_matches('/');
            let anchored = line.contains('/');
            let line = line.trim_start_matches('/');
            if line.is_empty() {
                continue;
            }
            let glob = GlobBuilder::new(line)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| ArchiveError::BadPattern {
                    line: number + 1,
                    pattern: line.to_string(),
                    reason: e.kind().to_string(),
                })?;
            rules.push(Rule {
                matcher: glob.compile_matcher(),
                negate,
                dir_only,
                anchored,
            });
        }
        Ok(Self { rules })
    }

    /// Returns whether `path` (relative to the uploaded directory, `/`-separated) is left out.
    pub fn is_ignored(&self, path: &str, is_dir: bool) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        if name == ".git" {
            return true;
        }
        let mut ignored = false;
        for rule in &self.rules {
            if rule.negate != ignored || (rule.dir_only && !is_dir) {
                continue;
            }
            let subject = if rule.anchored { path } else { name };
            if rule.matcher.is_match(subject) {
                ignored = !rule.negate;
            }
        }
        ignored
    }
}
