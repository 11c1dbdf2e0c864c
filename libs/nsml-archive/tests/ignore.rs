//! `.nsmlignore` matching.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use nsml_archive::IgnoreRules;

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
    assert!(
        r.is_ignored(".hidden.pyc", false),
        "`*` matches a leading dot"
    );
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
    let r = rules("model_?.pt\n\\#notes\n[ab].bin\n\\!bang\nCase.txt\n");
    assert!(r.is_ignored("model_1.pt", false));
    assert!(!r.is_ignored("model_10.pt", false));
    assert!(r.is_ignored("#notes", false));
    assert!(r.is_ignored("!bang", false));
    assert!(r.is_ignored("a.bin", false));
    assert!(!r.is_ignored("c.bin", false));
    assert!(
        !r.is_ignored("case.txt", false),
        "matching is case-sensitive"
    );
}

#[test]
fn invalid_patterns_name_their_line() {
    let err = IgnoreRules::parse("ok\n[z-a\n").unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("`[z-a`"), "{err}");
}
