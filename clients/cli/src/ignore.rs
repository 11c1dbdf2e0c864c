//! `.nsmlignore`: which files `nsml run` leaves out of the upload.
//!
//! The syntax is a subset of `.gitignore`: one glob pattern per line; blank lines and lines starting with `#` are
//! skipped (`\#` for a literal `#`); `!` re-includes what an earlier pattern excluded; a trailing `/` matches
//! directories only; a pattern with a `/` elsewhere is relative to the uploaded directory, one without matches a
//! name at any depth; `*` and `?` stay within one path component and `**` crosses them. An excluded directory is
//! not descended into, so nothing below it can be re-included. `.git` is always left out.

use anyhow::{Result, bail};
use glob::{MatchOptions, Pattern};

const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

#[derive(Debug, Clone)]
struct Rule {
    pattern: Pattern,
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
    pub fn parse(text: &str) -> Result<Self> {
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
            let pattern = match Pattern::new(line) {
                Ok(p) => p,
                Err(e) => bail!(
                    ".nsmlignore line {}: invalid pattern `{line}`: {e}",
                    number + 1
                ),
            };
            rules.push(Rule {
                pattern,
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
            if rule.pattern.matches_with(subject, OPTIONS) {
                ignored = !rule.negate;
            }
        }
        ignored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> IgnoreRules {
        IgnoreRules::parse(text).unwrap()
    }

    #[test]
    fn git_is_always_left_out() {
        let none = IgnoreRules::default();
        assert!(none.is_ignored(".git", true));
        assert!(none.is_ignored("sub/.git", true));
        assert!(!none.is_ignored("main.py", false));
        assert!(!none.is_ignored(".gitignore", false));
    }

    #[test]
    fn names_match_at_any_depth() {
        let r = rules("# caches\n*.pyc\n__pycache__\n\ncheckpoints/\n");
        assert!(r.is_ignored("a.pyc", false));
        assert!(r.is_ignored("pkg/deep/a.pyc", false));
        assert!(!r.is_ignored("a.py", false));
        assert!(r.is_ignored("pkg/__pycache__", true));
        assert!(r.is_ignored("checkpoints", true));
        assert!(r.is_ignored("runs/checkpoints", true));
        assert!(
            !r.is_ignored("checkpoints", false),
            "a trailing / matches directories only"
        );
        assert!(!r.is_ignored("# caches", false));
    }

    #[test]
    fn patterns_with_a_slash_are_anchored() {
        let r = rules("/data\nlogs/*.txt\ndocs/**/*.pdf\n**/tmp\n");
        assert!(r.is_ignored("data", true));
        assert!(!r.is_ignored("src/data", true));
        assert!(r.is_ignored("logs/a.txt", false));
        assert!(!r.is_ignored("logs/sub/a.txt", false), "* does not cross /");
        assert!(!r.is_ignored("other/logs/a.txt", false));
        assert!(r.is_ignored("docs/a/b/c.pdf", false));
        assert!(r.is_ignored("docs/c.pdf", false));
        assert!(r.is_ignored("tmp", true));
        assert!(r.is_ignored("x/y/tmp", true));
    }

    #[test]
    fn negation_reincludes_and_the_last_match_wins() {
        let r = rules("*.csv\n!keep.csv\n");
        assert!(r.is_ignored("train.csv", false));
        assert!(!r.is_ignored("keep.csv", false));
        assert!(!r.is_ignored("sub/keep.csv", false));
        let r = rules("!keep.csv\n*.csv\n");
        assert!(r.is_ignored("keep.csv", false));
    }

    #[test]
    fn wildcards_and_escapes() {
        let r = rules("model_?.pt\n\\#notes\n[ab].bin\n");
        assert!(r.is_ignored("model_1.pt", false));
        assert!(!r.is_ignored("model_10.pt", false));
        assert!(r.is_ignored("#notes", false));
        assert!(r.is_ignored("a.bin", false));
        assert!(!r.is_ignored("c.bin", false));
    }

    #[test]
    fn invalid_patterns_name_their_line() {
        let err = IgnoreRules::parse("ok\n[z-a\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
