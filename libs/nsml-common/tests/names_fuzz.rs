//! Property tests of the names clients send (session names, identifiers, checkpoint names, `rm` patterns):
//! checking any string never panics, and whatever passes is safe to use as a path component or a stream
//! name. Cases per property: `NSML_FUZZ_CASES` (256 unless set).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Component, Path};

use nsml_common::names::{SessionName, check_checkpoint, check_ident, wildcard_match};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("NSML_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Strings made of the characters that make names dangerous, and some ordinary ones.
fn hostile() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        4 => prop::sample::select(vec!['a', 'b', 'z', '0', '7', '-', '_']),
        3 => prop::sample::select(vec!['/', '.', '\\', '*', '?']),
        1 => prop::sample::select(vec!['\0', '\n', '\t', ' ', '\u{7f}', '\u{202e}', 'é', 'A', '%', ':']),
        1 => any::<char>(),
    ];
    prop_oneof![
        4 => prop::collection::vec(ch, 0..24).prop_map(|cs| cs.into_iter().collect()),
        1 => ".*",
        1 => prop::collection::vec(any::<char>(), 0..200).prop_map(|cs| cs.into_iter().collect()),
    ]
}

/// Session-like names: three parts, each often plain, sometimes hostile.
fn session_like() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        3 => "[a-z0-9][a-z0-9_-]{0,6}",
        1 => Just("..".to_string()),
        1 => Just(String::new()),
        1 => "[0-9]{1,25}",
        1 => "[+-]?[0-9]{1,3}",
        1 => hostile(),
    ];
    (part.clone(), part.clone(), part).prop_map(|(a, b, c)| format!("{a}/{b}/{c}"))
}

/// The identifier rule, written out apart from the checker.
fn is_ident(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// `*`/`?` matching by dynamic programming over characters, apart from the matcher under test.
fn reference_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // m[i][j]: the first i pattern characters match the first j name characters.
    let mut m = vec![vec![false; n.len() + 1]; p.len() + 1];
    m[0][0] = true;
    for i in 1..=p.len() {
        for j in 0..=n.len() {
            m[i][j] = match p[i - 1] {
                '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                '?' => j > 0 && m[i - 1][j - 1],
                c => j > 0 && n[j - 1] == c && m[i - 1][j - 1],
            };
        }
    }
    m[p.len()][n.len()]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn session_names_parse_to_three_clean_parts(s in prop_oneof![session_like(), hostile()]) {
        if let Ok(n) = SessionName::parse(&s) {
            prop_assert!(!n.team.is_empty() && !n.dataset.is_empty(), "`{s}` → {n:?}");
            prop_assert!(!n.team.contains('/') && !n.dataset.contains('/'), "`{s}` → {n:?}");
            prop_assert_eq!(s.split('/').count(), 3);
            // The name it stands for parses to itself, and its stream is the team's on that dataset.
            let again = SessionName::parse(&n.to_string());
            prop_assert_eq!(again.as_ref().ok(), Some(&n));
            prop_assert_eq!(n.stream(), format!("sessions-{}/{}", n.team, n.dataset));
        }
    }

    #[test]
    fn identifiers_are_plain(s in prop_oneof!["[a-z0-9][a-z0-9_-]{0,70}", hostile()]) {
        let ok = check_ident("team", &s).is_ok();
        prop_assert_eq!(ok, is_ident(&s), "`{}`", s.escape_debug());
        if ok {
            prop_assert!(!s.contains('/') && !s.contains('.') && !s.contains('\\'));
        }
    }

    #[test]
    fn checkpoint_names_are_one_path_component(s in prop_oneof!["[a-z0-9.]{0,4}", hostile()]) {
        if check_checkpoint(&s).is_ok() {
            prop_assert!(!s.is_empty() && s.len() <= 128, "`{}`", s.escape_debug());
            prop_assert!(
                !s.contains(['/', '\\', '\0']) && !s.chars().any(char::is_control),
                "`{}`",
                s.escape_debug()
            );
            // Joined to a directory it names a child of that directory, never the directory or its parent.
            let comps: Vec<Component> = Path::new(&s).components().collect();
            prop_assert_eq!(comps.len(), 1, "`{}` is {:?}", s.escape_debug(), comps);
            prop_assert!(matches!(comps[0], Component::Normal(c) if c == s.as_str()));
        }
    }

    #[test]
    fn wildcards_match_like_a_reference(
        pattern in prop_oneof![hostile(), "[ab*?/]{0,10}"],
        name in prop_oneof![hostile(), "[ab/]{0,12}"],
    ) {
        prop_assert_eq!(
            wildcard_match(&pattern, &name),
            reference_match(&pattern, &name),
            "`{}` against `{}`",
            pattern.escape_debug(),
            name.escape_debug()
        );
        prop_assert!(wildcard_match("*", &name));
        if !name.contains(['*', '?']) {
            prop_assert!(wildcard_match(&name, &name));
        }
    }
}

/// The reference matcher agrees with the examples the platform's `rm` is documented with, so that the
/// comparison above can fail.
#[test]
fn the_reference_matches_rm_examples() {
    assert!(reference_match("me/kin/1*", "me/kin/12"));
    assert!(!reference_match("me/kin/1?", "me/kin/123"));
    assert!(!reference_match("me/kin/1*", "me/kin/21"));
    assert!(!is_ident("Demo") && !is_ident("-x") && is_ident("t1-cls"));
}
