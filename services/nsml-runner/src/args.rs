//! Splits a session's argument string the way a POSIX shell would, without running a shell.
//!
//! Supported: whitespace separation, single quotes (literal), double quotes (where `\` escapes `"`,
//! `\`, `$`, `` ` `` and a newline), and `\` outside quotes escaping the next character. Nothing is
//! expanded: `$HOME`, `*` and `~` reach the entry as typed.
//!
//! Ours rather than the `shlex` crate's: `shlex` drops a word starting with `#` (`--tag #1`), turns a
//! backslash-newline into an extra empty argument, and cannot say which quote is left open.

use crate::error::{Result, RunnerError};

/// The arguments a submit session's entry gets after the session's own: NSML's `--mode test --pause 1`.
pub const SUBMIT_ARGS: [&str; 4] = ["--mode", "test", "--pause", "1"];

/// Splits `s` into arguments.
pub fn split_args(s: &str) -> Result<Vec<String>> {
    let bad = |why| RunnerError::Args {
        args: s.to_string(),
        why,
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(bad("unterminated single quote")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(bad("unterminated double quote")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(bad("unterminated double quote")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    cur.push(c);
                }
                None => return Err(bad("trailing backslash")),
            },
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
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
