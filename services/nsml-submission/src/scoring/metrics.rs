//! The metrics the scorer computes itself, each over a subset of the test items.

use std::collections::{HashMap, HashSet};

use nsml_proto::v1::Direction;

use super::ScoreError;
use super::predictions::canonical_number;

/// A metric the scorer computes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Share of items whose predicted class equals the label.
    Accuracy,
    /// Mean over the classes present in the labels of each class's F1.
    MacroF1,
    /// Mean squared error.
    Mse,
    /// Root mean squared error.
    Rmse,
    /// Mean absolute error.
    Mae,
    /// Character error rate: total character edit distance over total reference length.
    Cer,
    /// Word error rate: total edit distance over whitespace tokens over total reference words.
    Wer,
}

impl Metric {
    /// Every metric, in display order.
    pub const ALL: [Metric; 7] = [
        Metric::Accuracy,
        Metric::MacroF1,
        Metric::Mse,
        Metric::Rmse,
        Metric::Mae,
        Metric::Cer,
        Metric::Wer,
    ];

    /// Parses a metric name as manifests write it (`accuracy`, `macro_f1`, `mse`, …), ignoring case, `-`, `_`
    /// and spaces; `None` for names the scorer does not compute (such as `custom`, which runs an eval script).
    pub fn parse(name: &str) -> Option<Metric> {
        let n: String = name
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .flat_map(char::to_lowercase)
            .collect();
        Some(match n.as_str() {
            "accuracy" | "acc" => Metric::Accuracy,
            "macrof1" | "f1macro" | "f1" => Metric::MacroF1,
            "mse" => Metric::Mse,
            "rmse" => Metric::Rmse,
            "mae" => Metric::Mae,
            "cer" => Metric::Cer,
            "wer" => Metric::Wer,
            _ => return None,
        })
    }

    /// Returns the order in which scores rank: accuracy and F1 larger first, errors smaller first.
    pub fn direction(&self) -> Direction {
        match self {
            Metric::Accuracy | Metric::MacroF1 => Direction::Descending,
            Metric::Mse | Metric::Rmse | Metric::Mae | Metric::Cer | Metric::Wer => {
                Direction::Ascending
            }
        }
    }

    /// Returns the name shown in leaderboard headers (`Accuracy`, `Macro-F1`, `MSE`, …).
    pub fn display(&self) -> &'static str {
        match self {
            Metric::Accuracy => "Accuracy",
            Metric::MacroF1 => "Macro-F1",
            Metric::Mse => "MSE",
            Metric::Rmse => "RMSE",
            Metric::Mae => "MAE",
            Metric::Cer => "CER",
            Metric::Wer => "WER",
        }
    }

    fn is_regression(&self) -> bool {
        matches!(self, Metric::Mse | Metric::Rmse | Metric::Mae)
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.display())
    }
}

/// Scores predictions on a subset of the test keys.
///
/// Classification metrics compare normalised text (trimmed; numbers canonical, so `1`, `1.0` and `"1"` match);
/// regression metrics parse both sides as numbers; CER and WER compare trimmed text.
pub fn compute(
    metric: Metric,
    labels: &HashMap<String, String>,
    preds: &HashMap<String, String>,
    keys: &[String],
) -> Result<f64, ScoreError> {
    if keys.is_empty() {
        return Err(ScoreError::Empty);
    }
    let mut pairs = Vec::with_capacity(keys.len());
    let mut missing = Vec::new();
    for k in keys {
        let label = labels
            .get(k)
            .ok_or_else(|| ScoreError::NoLabel { key: k.clone() })?;
        match preds.get(k) {
            Some(p) => pairs.push((k.as_str(), label.as_str(), p.as_str())),
            None => missing.push(k),
        }
    }
    if let Some(example) = missing.first() {
        return Err(ScoreError::Missing {
            count: missing.len(),
            example: (*example).clone(),
        });
    }
    if metric.is_regression() {
        return regression(metric, &pairs);
    }
    if matches!(metric, Metric::Accuracy | Metric::MacroF1) {
        not_finite_classes(metric, &pairs)?;
    }
    Ok(match metric {
        Metric::Accuracy => {
            let correct = pairs
                .iter()
                .filter(|(_, l, p)| class(l) == class(p))
                .count();
            correct as f64 / pairs.len() as f64
        }
        Metric::MacroF1 => macro_f1(&pairs),
        Metric::Cer => error_rate(metric, &pairs, |s| s.chars().collect::<Vec<_>>())?,
        Metric::Wer => error_rate(metric, &pairs, |s| s.split_whitespace().collect::<Vec<_>>())?,
        Metric::Mse | Metric::Rmse | Metric::Mae => unreachable!("handled above"),
    })
}

/// Refuses a prediction that is a non-finite number (`NaN`, `inf`) unless the labels hold it as a class: it is
/// a model's raw output, which would otherwise be scored silently as wrong.
fn not_finite_classes(metric: Metric, pairs: &[(&str, &str, &str)]) -> Result<(), ScoreError> {
    let not_finite = |s: &str| s.trim().parse::<f64>().is_ok_and(|f| !f.is_finite());
    let Some((key, _, value)) = pairs.iter().find(|(_, _, p)| not_finite(p)) else {
        return Ok(());
    };
    let classes: HashSet<String> = pairs.iter().map(|(_, l, _)| class(l)).collect();
    if classes.contains(&class(value)) {
        return Ok(());
    }
    Err(ScoreError::NotAClass {
        key: key.to_string(),
        value: truncate(value, 40),
        metric: metric.display(),
    })
}

/// A class label as compared: trimmed, and numbers canonical.
fn class(s: &str) -> String {
    let t = s.trim();
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => canonical_number(f),
        _ => t.to_string(),
    }
}

fn macro_f1(pairs: &[(&str, &str, &str)]) -> f64 {
    let classes: HashSet<String> = pairs.iter().map(|(_, l, _)| class(l)).collect();
    let mut tp: HashMap<&str, usize> = HashMap::new();
    let mut fp: HashMap<&str, usize> = HashMap::new();
    let mut fn_: HashMap<&str, usize> = HashMap::new();
    let normalised: Vec<(String, String)> =
        pairs.iter().map(|(_, l, p)| (class(l), class(p))).collect();
    for (l, p) in &normalised {
        if l == p {
            *tp.entry(l.as_str()).or_default() += 1;
        } else {
            *fn_.entry(l.as_str()).or_default() += 1;
            *fp.entry(p.as_str()).or_default() += 1;
        }
    }
    let f1_sum: f64 = classes
        .iter()
        .map(|c| {
            let tp = tp.get(c.as_str()).copied().unwrap_or(0) as f64;
            let fp = fp.get(c.as_str()).copied().unwrap_or(0) as f64;
            let fn_ = fn_.get(c.as_str()).copied().unwrap_or(0) as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            }
        })
        .sum();
    f1_sum / classes.len() as f64
}

fn regression(metric: Metric, pairs: &[(&str, &str, &str)]) -> Result<f64, ScoreError> {
    let name = metric.display();
    let mut sum = 0.0;
    for (k, l, p) in pairs {
        let label = parse_finite(l).ok_or_else(|| ScoreError::LabelNotNumber {
            key: k.to_string(),
            metric: name,
        })?;
        let pred = parse_finite(p).ok_or_else(|| ScoreError::NotNumber {
            key: k.to_string(),
            value: truncate(p, 40),
            metric: name,
        })?;
        let d = pred - label;
        sum += if metric == Metric::Mae {
            d.abs()
        } else {
            d * d
        };
    }
    let mean = sum / pairs.len() as f64;
    Ok(if metric == Metric::Rmse {
        mean.sqrt()
    } else {
        mean
    })
}

pub(crate) fn parse_finite(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|f| f.is_finite())
}

fn error_rate<'s, T: PartialEq>(
    metric: Metric,
    pairs: &[(&str, &'s str, &'s str)],
    tokens: impl Fn(&'s str) -> Vec<T>,
) -> Result<f64, ScoreError> {
    let mut distance = 0usize;
    let mut length = 0usize;
    for (_, l, p) in pairs {
        let reference = tokens(l.trim());
        let hypothesis = tokens(p.trim());
        distance += levenshtein(&reference, &hypothesis);
        length += reference.len();
    }
    match (length, distance) {
        (0, 0) => Ok(0.0),
        (0, _) => Err(ScoreError::Undefined {
            metric: metric.display(),
            reason: "every reference text of this part is empty".into(),
        }),
        _ => Ok(distance as f64 / length as f64),
    }
}

/// The edit distance (insertions, deletions, substitutions) between two token sequences.
fn levenshtein<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(x != y);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::test_support::{close, map, strings};

    /// Scores `preds` against `labels` over every key.
    fn score_all(metric: Metric, labels: &[(&str, &str)], preds: &[(&str, &str)]) -> f64 {
        let keys: Vec<String> = labels.iter().map(|(k, _)| k.to_string()).collect();
        compute(metric, &map(labels), &map(preds), &keys).expect("scores")
    }

    #[test]
    fn metric_names_directions_and_display() {
        assert_eq!(Metric::parse("accuracy"), Some(Metric::Accuracy));
        assert_eq!(Metric::parse("macro_f1"), Some(Metric::MacroF1));
        assert_eq!(Metric::parse("Macro-F1"), Some(Metric::MacroF1));
        assert_eq!(Metric::parse("MSE"), Some(Metric::Mse));
        assert_eq!(Metric::parse("rmse"), Some(Metric::Rmse));
        assert_eq!(Metric::parse("mae"), Some(Metric::Mae));
        assert_eq!(Metric::parse("cer"), Some(Metric::Cer));
        assert_eq!(Metric::parse("WER"), Some(Metric::Wer));
        assert_eq!(Metric::parse("custom"), None);
        assert_eq!(Metric::parse("bleu"), None);
        assert_eq!(Metric::Accuracy.direction(), Direction::Descending);
        assert_eq!(Metric::MacroF1.direction(), Direction::Descending);
        for m in [
            Metric::Mse,
            Metric::Rmse,
            Metric::Mae,
            Metric::Cer,
            Metric::Wer,
        ] {
            assert_eq!(m.direction(), Direction::Ascending, "{m}");
        }
        let shown: Vec<&str> = Metric::ALL.iter().map(Metric::display).collect();
        assert_eq!(
            shown,
            ["Accuracy", "Macro-F1", "MSE", "RMSE", "MAE", "CER", "WER"]
        );
        for m in Metric::ALL {
            assert_eq!(Metric::parse(m.display()), Some(m));
        }
    }

    #[test]
    fn accuracy_counts_matching_classes() {
        let l = [("a", "cat"), ("b", "dog"), ("c", "cat"), ("d", "bird")];
        let p = [("a", "cat"), ("b", "cat"), ("c", "cat"), ("d", "dog")];
        assert!(close(score_all(Metric::Accuracy, &l, &p), 0.5));
    }

    #[test]
    fn accuracy_matches_numbers_written_differently() {
        let l = [("a", "1"), ("b", "0"), ("c", "2"), ("d", "x")];
        let p = [("a", "1.0"), ("b", " 0 "), ("c", "2.00"), ("d", "X")];
        // `X` is not `x`: text classes are case-sensitive.
        assert!(close(score_all(Metric::Accuracy, &l, &p), 0.75));
    }

    #[test]
    fn macro_f1_averages_per_class_f1_over_label_classes() {
        // cat: tp 1 (a), fn 1 (c→dog), fp 1 (b→cat): F1 = 2/(2+1+1) = 0.5
        // dog: tp 0 → 0
        // bird: tp 1 (d), no errors: F1 = 1
        let l = [("a", "cat"), ("b", "dog"), ("c", "cat"), ("d", "bird")];
        let p = [("a", "cat"), ("b", "cat"), ("c", "dog"), ("d", "bird")];
        assert!(close(
            score_all(Metric::MacroF1, &l, &p),
            (0.5 + 0.0 + 1.0) / 3.0
        ));
    }

    #[test]
    fn macro_f1_ignores_predicted_classes_absent_from_labels_except_as_errors() {
        // Labels have one class `1`; the prediction `7` is a miss for `1` but adds no class of its own.
        // 1: tp 1, fn 1 → F1 = 2/(2+0+1) = 2/3.
        let l = [("a", "1"), ("b", "1")];
        let p = [("a", "1.0"), ("b", "7")];
        assert!(close(score_all(Metric::MacroF1, &l, &p), 2.0 / 3.0));
    }

    #[test]
    fn perfect_predictions_score_one() {
        let l = [("a", "x"), ("b", "y")];
        assert!(close(score_all(Metric::MacroF1, &l, &l), 1.0));
        assert!(close(score_all(Metric::Accuracy, &l, &l), 1.0));
    }

    #[test]
    fn regression_metrics() {
        let l = [("a", "1"), ("b", "2"), ("c", "3")];
        let p = [("a", "2"), ("b", "2"), ("c", "0.5")];
        // errors 1, 0, -2.5 → squared 1, 0, 6.25
        assert!(close(score_all(Metric::Mse, &l, &p), 7.25 / 3.0));
        assert!(close(
            score_all(Metric::Rmse, &l, &p),
            (7.25f64 / 3.0).sqrt()
        ));
        assert!(close(score_all(Metric::Mae, &l, &p), 3.5 / 3.0));
    }

    #[test]
    fn cer_is_total_char_edits_over_total_reference_chars() {
        // "안녕하세요" vs "안녕하세오": 1 substitution over 5; "abc" vs "abcd": 1 insertion over 3.
        let l = [("a", "안녕하세요"), ("b", "abc")];
        let p = [("a", "안녕하세오"), ("b", "abcd")];
        assert!(close(score_all(Metric::Cer, &l, &p), 2.0 / 8.0));
        // Case: "kitten" → "sitting" is the classic 3 edits over 6.
        assert!(close(
            score_all(Metric::Cer, &[("k", "kitten")], &[("k", "sitting")]),
            0.5
        ));
    }

    #[test]
    fn wer_is_total_word_edits_over_total_reference_words() {
        // "the cat sat" vs "the cat sat down": 1 insertion over 3; "a b" vs "a  c": 1 substitution over 2.
        let l = [("a", "the cat sat"), ("b", "a b")];
        let p = [("a", "the cat sat down"), ("b", "a  c")];
        assert!(close(score_all(Metric::Wer, &l, &p), 2.0 / 5.0));
        assert!(close(
            score_all(Metric::Wer, &[("a", "x y z")], &[("a", "")]),
            1.0
        ));
    }

    #[test]
    fn error_rate_on_empty_references() {
        assert_eq!(score_all(Metric::Cer, &[("a", "")], &[("a", "")]), 0.0);
        let err = compute(
            Metric::Cer,
            &map(&[("a", "")]),
            &map(&[("a", "x")]),
            &strings(&["a"]),
        )
        .unwrap_err();
        assert!(
            matches!(err, ScoreError::Undefined { metric: "CER", .. }),
            "{err}"
        );
    }

    #[test]
    fn levenshtein_distances() {
        let d = |a: &str, b: &str| {
            levenshtein(
                &a.chars().collect::<Vec<_>>(),
                &b.chars().collect::<Vec<_>>(),
            )
        };
        assert_eq!(d("", ""), 0);
        assert_eq!(d("abc", ""), 3);
        assert_eq!(d("", "ab"), 2);
        assert_eq!(d("flaw", "lawn"), 2);
        assert_eq!(d("kitten", "sitting"), 3);
    }

    #[test]
    fn score_only_uses_the_given_keys() {
        let l = map(&[("a", "1"), ("b", "2")]);
        let p = map(&[("a", "1"), ("b", "9")]);
        assert_eq!(
            compute(Metric::Accuracy, &l, &p, &strings(&["a"])).unwrap(),
            1.0
        );
        assert_eq!(
            compute(Metric::Accuracy, &l, &p, &strings(&["b"])).unwrap(),
            0.0
        );
    }

    #[test]
    fn score_errors() {
        let l = map(&[("a", "1"), ("b", "x")]);
        let p = map(&[("a", "oops"), ("b", "2")]);
        let err = compute(Metric::Mse, &l, &p, &strings(&["a"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the prediction for `a` is not a finite number: `oops` (MSE needs numbers)"
        );
        let err = compute(Metric::Mae, &l, &p, &strings(&["b"])).unwrap_err();
        assert!(matches!(err, ScoreError::LabelNotNumber { .. }), "{err}");
        assert!(
            !err.to_string().contains("`x`"),
            "a label leaked into the reason: {err}"
        );
        let nan = map(&[("a", "NaN"), ("b", "1")]);
        assert!(matches!(
            compute(Metric::Rmse, &l, &nan, &strings(&["a"])).unwrap_err(),
            ScoreError::NotNumber { .. }
        ));
        for metric in [Metric::Accuracy, Metric::MacroF1] {
            let err = compute(metric, &l, &nan, &strings(&["a", "b"])).unwrap_err();
            assert!(
                matches!(&err, ScoreError::NotAClass { key, value, .. } if key == "a" && value == "NaN"),
                "a NaN class is a named failure: {err}"
            );
        }
        let inf = map(&[("a", "-Infinity"), ("b", "1")]);
        assert!(matches!(
            compute(Metric::Accuracy, &l, &inf, &strings(&["a"])).unwrap_err(),
            ScoreError::NotAClass { .. }
        ));
        // A label set that holds the class `NaN` scores it as a class.
        let nan_class = map(&[("a", "NaN"), ("b", "x")]);
        assert_eq!(
            compute(Metric::Accuracy, &nan_class, &nan, &strings(&["a"])).unwrap(),
            1.0
        );
        assert!(matches!(
            compute(Metric::Accuracy, &l, &p, &[]).unwrap_err(),
            ScoreError::Empty
        ));
        let err = compute(Metric::Accuracy, &l, &map(&[]), &strings(&["a", "b"])).unwrap_err();
        assert_eq!(err.to_string(), "no prediction for 2 test items, e.g. `a`");
        let err = compute(Metric::Accuracy, &l, &p, &strings(&["zz"])).unwrap_err();
        assert!(matches!(err, ScoreError::NoLabel { .. }), "{err}");
    }
}
