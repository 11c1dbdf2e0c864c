//! Splits a session's argument string the way a POSIX shell would, without running a shell
//! (through `shlex`).
//!
//! Supported: separation by spaces, tabs and newlines, single quotes (literal), double quotes (where
//! `\` escapes `"`, `\`, `$`, `` ` `` and a newline), `\` outside quotes escaping the next character,
//! and a word starting with `#` beginning a comment to the end of the line. Nothing is expanded:
//! `$HOME`, `*` and `~` reach the entry as typed.

use crate::error::{Result, RunnerError};

/// The arguments a submit session's entry gets after the session's own: NSML's `--mode test --pause 1`.
pub const SUBMIT_ARGS: [&str; 4] = ["--mode", "test", "--pause", "1"];

/// Splits `s` into arguments.
pub fn split_args(s: &str) -> Result<Vec<String>> {
    shlex::split(s).ok_or_else(|| RunnerError::Args {
        args: s.to_string(),
        why: "a quote is not closed or a backslash ends them",
    })
}

/// The arguments a session's entry is started with: `args` split, and for a submit NSML's
/// `--mode test --pause 1` appended unless the session's args already end with it.
pub fn entry_args(args: &str, submit: bool) -> Result<Vec<String>> {
    let mut out = split_args(args)?;
    if submit && !out.ends_with(&SUBMIT_ARGS.map(String::from)) {
        out.extend(SUBMIT_ARGS.map(String::from));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<String> {
        split_args(s).unwrap()
    }

    #[test]
    fn splits_on_whitespace() {
        assert_eq!(
            split("  --epochs 10\t--lr  0.1 \n"),
            ["--epochs", "10", "--lr", "0.1"]
        );
        assert!(split("").is_empty());
        assert!(split("   ").is_empty());
    }

    #[test]
    fn honours_quotes_and_escapes() {
        assert_eq!(
            split(r#"--name "my model" --tag 'a b'"#),
            ["--name", "my model", "--tag", "a b"]
        );
        assert_eq!(split(r#"--x="a \"q\" \$b \n""#), [r#"--x=a "q" $b \n"#]);
        assert_eq!(split(r"a\ b c"), ["a b", "c"]);
        assert_eq!(split(r"'it'\''s'"), ["it's"]);
        assert_eq!(split(r#"'' """#), ["", ""]);
        assert_eq!(split("'$HOME' *"), ["$HOME", "*"]);
    }

    #[test]
    fn a_word_starting_with_hash_is_a_comment_as_in_a_shell() {
        assert_eq!(split("--color=#fff a#b"), ["--color=#fff", "a#b"]);
        assert_eq!(
            split("--lr 0.1 # tuned\n--epochs 3"),
            ["--lr", "0.1", "--epochs", "3"]
        );
        assert_eq!(split("--tag '#1'"), ["--tag", "#1"]);
    }

    #[test]
    fn refuses_unterminated_quotes() {
        for bad in ["'open", "\"open", "trailing\\", "\"a\\"] {
            let err = split_args(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid args"), "{bad}: {err}");
        }
    }

    #[test]
    fn submits_get_nsml_test_mode_once() {
        assert_eq!(entry_args("", true).unwrap(), SUBMIT_ARGS);
        assert_eq!(
            entry_args("--mode test --pause 1", true).unwrap(),
            SUBMIT_ARGS
        );
        assert_eq!(
            entry_args("--epochs 3", true).unwrap(),
            ["--epochs", "3", "--mode", "test", "--pause", "1"]
        );
        assert_eq!(entry_args("--epochs 3", false).unwrap(), ["--epochs", "3"]);
    }
}
