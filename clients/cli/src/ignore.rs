//! `.nsmlignore`: which files `nsml run` leaves out of the upload.
//!
//! The syntax is a subset of `.gitignore` (see `nsml_archive::ignore`): one glob pattern per line; blank lines
//! and lines starting with `#` are skipped (`\#` for a literal `#`); `!` re-includes what an earlier pattern
//! excluded; a trailing `/` matches directories only; a pattern with a `/` elsewhere is relative to the uploaded
//! directory, one without matches a name at any depth; `*` and `?` stay within one path component and `**`
//! crosses them. An excluded directory is not descended into, so nothing below it can be re-included. `.git` is
//! always left out.

use anyhow::Result;

/// The parsed patterns of one `.nsmlignore`.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules(nsml_archive::IgnoreRules);

impl IgnoreRules {
    /// Parses the text of a `.nsmlignore`; an invalid pattern is an error naming its line.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(Self(nsml_archive::IgnoreRules::parse(text)?))
    }

    /// The rules, for the archive crate's walk.
    pub(crate) fn inner(&self) -> &nsml_archive::IgnoreRules {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_parsed_and_matched() {
        let r = IgnoreRules::parse("*.pyc\n!keep.pyc\ndata/\n").unwrap();
        assert!(r.inner().is_ignored("pkg/a.pyc", false));
        assert!(!r.inner().is_ignored("keep.pyc", false));
        assert!(r.inner().is_ignored("data", true));
        assert!(IgnoreRules::default().inner().is_ignored(".git", true));
    }

    #[test]
    fn invalid_patterns_name_their_line() {
        let err = IgnoreRules::parse("ok\n[z-a\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
