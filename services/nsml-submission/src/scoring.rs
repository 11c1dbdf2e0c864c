//! The trusted scorer: compares what a submit session's `infer` returned with the hidden test labels.
//!
//! It runs in the submission service, outside any sandbox, and never executes participant code. Everything here is
//! pure except [`eval_script`], which runs a host-provided evaluation script for datasets whose metric is `custom`.
//! [`score`] scores one submit:
//!
//! 1. [`labels::parse_labels`] reads the dataset's labels file (`KEY,LABEL` CSV with a header) into [`Labels`]
//!    (done by the caller, since a bad labels file is the host's problem, not the participant's);
//! 2. [`predictions::normalize_predictions`] turns the predictions JSON, in any shape an NSML competition used,
//!    into key → predicted value;
//! 3. [`split::split`] divides the test keys into the public and the private part, deterministically;
//! 4. [`metrics::compute`] computes the dataset's [`Metric`] on each part.
//!
//! Every [`ScoreError`] message is written for the participant: it becomes the submit's failure reason. None of
//! them quotes a label value, so a crafted prediction cannot read the hidden labels back through an error.

pub mod eval_script;
pub mod labels;
pub mod metrics;
pub mod predictions;
pub mod split;

pub use labels::{Labels, parse_labels};
pub use metrics::Metric;

/// Why a submit could not be scored. The message is shown to the participant as the submit's failure reason.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// The labels file is malformed (a dataset problem, not the participant's).
    #[error("invalid labels file: {0}")]
    Labels(String),
    /// The predictions are neither a list nor a dict.
    #[error("predictions must be a list or a dict, got {got}")]
    Shape { got: &'static str },
    /// The items of a predictions list are of different shapes.
    #[error("predictions mix shapes: item 0 is {first}, item {index} is {other}")]
    MixedShapes {
        first: &'static str,
        index: usize,
        other: &'static str,
    },
    /// A positional predictions list (in label-file order) has the wrong length.
    #[error("predictions have {}, the test set has {want}", items(*got))]
    Count { got: usize, want: usize },
    /// Some test items have no prediction.
    #[error("no prediction for {count} test {}, e.g. `{example}`", if *count == 1 { "item" } else { "items" })]
    Missing { count: usize, example: String },
    /// Some predictions name items the test set does not have.
    #[error(
        "predictions name {} not in the test set, e.g. `{example}` (test items look like `{expected}`)",
        items(*count)
    )]
    Unknown {
        count: usize,
        example: String,
        expected: String,
    },
    /// One test item is predicted twice.
    #[error("the test item `{key}` is predicted more than once")]
    Duplicate { key: String },
    /// Prediction records (dicts) carry no field naming the item.
    #[error(
        "prediction records need a field naming the test item ({candidates}); the first record has {found}"
    )]
    NoKeyField { candidates: String, found: String },
    /// Prediction records carry no field holding the predicted value.
    #[error(
        "prediction records need a field holding the prediction ({candidates}); the first record has {found}"
    )]
    NoValueField { candidates: String, found: String },
    /// A prediction record lacks the field the first record had.
    #[error("prediction {index} has no `{field}` field")]
    MissingField { index: usize, field: String },
    /// A prediction's item key is not a string or a number.
    #[error("prediction {index} names its test item with {got}; use a string or a number")]
    BadKey { index: usize, got: &'static str },
    /// A predicted value is not a number or a string.
    #[error("the prediction for `{key}` must be a number or a string, got {got}")]
    BadValue { key: String, got: &'static str },
    /// A regression metric got a prediction that is not a finite number.
    #[error(
        "the prediction for `{key}` is not a finite number: `{value}` ({metric} needs numbers)"
    )]
    NotNumber {
        key: String,
        value: String,
        metric: &'static str,
    },
    /// A classification prediction is a number that is not finite (`NaN`, `Infinity`): a model output that was
    /// never turned into a class, not a class the labels hold.
    #[error(
        "the prediction for `{key}` is `{value}`, not a class ({metric} compares class labels; a NaN usually \
         means the model's output was not turned into a class, e.g. no argmax was taken)"
    )]
    NotAClass {
        key: String,
        value: String,
        metric: &'static str,
    },
    /// A regression metric's label is not a number (a dataset problem).
    #[error(
        "the label of test item `{key}` is not a number, so {metric} cannot be computed; tell the host"
    )]
    LabelNotNumber { key: String, metric: &'static str },
    /// A key to score has no label (the split and the labels disagree).
    #[error("the test item `{key}` has no label")]
    NoLabel { key: String },
    /// The subset to score is empty.
    #[error("nothing to score: the test subset is empty")]
    Empty,
    /// The metric has no value on these labels.
    #[error("{metric} is undefined here: {reason}")]
    Undefined {
        metric: &'static str,
        reason: String,
    },
    /// The predictions are not JSON at all.
    #[error("predictions are not valid JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// The evaluation script could not be started, or its files written.
    #[error("cannot run the evaluation script: {0}")]
    EvalIo(#[from] std::io::Error),
    /// The evaluation script ran past its time limit and was killed.
    #[error("the evaluation script did not finish within {secs} seconds")]
    EvalTimeout { secs: u64 },
    /// The evaluation script exited unsuccessfully. Its stderr is kept for the operators' log only: a script that
    /// fails on crafted predictions could print labels there.
    #[error("the evaluation script failed ({status})")]
    EvalFailed { status: String, stderr: String },
    /// The evaluation script's last line is not a number.
    #[error("the evaluation script printed no score: its last line was `{line}`")]
    EvalOutput { line: String },
}

fn items(n: usize) -> String {
    if n == 1 {
        "1 item".into()
    } else {
        format!("{n} items")
    }
}

/// Which test items the scores cover.
#[derive(Debug, Clone, PartialEq)]
pub enum Partition {
    /// One score over every item (a trial submit).
    Whole,
    /// A public score and a private one, the items divided as [`split::split`] does.
    PublicPrivate {
        /// The items listed as private by the host; empty to draw them by `fraction` and `seed`.
        private_keys: Vec<String>,
        fraction: f64,
        seed: u64,
    },
}

/// A submit's scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// The score on the public part (on every item for [`Partition::Whole`]).
    pub public: f64,
    /// The score on the private part; `None` when there is none.
    pub private: Option<f64>,
}

/// Scores predictions (JSON, as `infer` returned them) against the labels, over the parts `partition` names.
///
/// Pure: no IO, no clock. A failure of either part fails the whole submit, the public part's reason first.
pub fn score(
    labels: &Labels,
    predictions_json: &str,
    partition: &Partition,
    metric: Metric,
) -> Result<Scores, ScoreError> {
    let predictions: serde_json::Value = serde_json::from_str(predictions_json)?;
    let preds = predictions::normalize_predictions(&predictions, labels)?;
    let by_key = labels.to_map();
    let keys = labels.keys();
    match partition {
        Partition::Whole => Ok(Scores {
            public: metrics::compute(metric, &by_key, &preds, &keys)?,
            private: None,
        }),
        Partition::PublicPrivate {
            private_keys,
            fraction,
            seed,
        } => {
            let (public, private) = split::split(&keys, private_keys, *fraction, *seed);
            let public = metrics::compute(metric, &by_key, &preds, &public);
            let private = if private.is_empty() {
                Ok(None)
            } else {
                metrics::compute(metric, &by_key, &preds, &private).map(Some)
            };
            Ok(Scores {
                public: public?,
                private: private?,
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers the scoring modules' tests share.

    use std::collections::HashMap;

    use super::{Labels, parse_labels};

    pub(crate) const CLS: &str = "id,label\na,cat\nb,dog\nc,cat\n";

    pub(crate) fn labels(csv: &str) -> Labels {
        parse_labels(csv).expect("valid labels")
    }

    pub(crate) fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    pub(crate) fn map(v: &[(&str, &str)]) -> HashMap<String, String> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(crate) fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{close, labels, strings};
    use super::*;

    const SIX: &str = "id,label\na,cat\nb,dog\nc,cat\nd,dog\ne,cat\nf,dog\n";

    #[test]
    fn a_trial_submit_is_scored_on_every_item_with_no_private_score() {
        // Given labels of three items and predictions right on two of them
        let l = labels(CLS_3);
        // When the whole set is scored
        let got = score(
            &l,
            r#"{"a": "cat", "b": "cat", "c": "cat"}"#,
            &Partition::Whole,
            Metric::Accuracy,
        )
        .unwrap();
        // Then the score covers all three, and there is no private part
        assert!(close(got.public, 2.0 / 3.0), "{got:?}");
        assert_eq!(got.private, None);
    }

    #[test]
    fn a_test_submit_is_scored_on_the_public_and_the_private_part_apart() {
        // Given six items, of which the host lists `a`, `b` and `c` as private
        let l = labels(SIX);
        let partition = Partition::PublicPrivate {
            private_keys: strings(&["a", "b", "c"]),
            fraction: 0.5,
            seed: 1,
        };
        // When predictions right on every private item and wrong on every public one are scored
        let preds = r#"{"a": "cat", "b": "dog", "c": "cat", "d": "cat", "e": "dog", "f": "cat"}"#;
        let got = score(&l, preds, &partition, Metric::Accuracy).unwrap();
        // Then the public score is 0 and the private one 1
        assert_eq!(
            got,
            Scores {
                public: 0.0,
                private: Some(1.0)
            }
        );
    }

    #[test]
    fn the_same_predictions_and_seed_always_score_the_same() {
        // Given a drawn split
        let l = labels(SIX);
        let partition = Partition::PublicPrivate {
            private_keys: vec![],
            fraction: 0.5,
            seed: 42,
        };
        let preds = r#"["cat", "cat", "cat", "cat", "cat", "cat"]"#;
        // When the same predictions are scored twice
        let first = score(&l, preds, &partition, Metric::Accuracy).unwrap();
        let second = score(&l, preds, &partition, Metric::Accuracy).unwrap();
        // Then both parts score the same, and both have a score
        assert_eq!(first, second);
        assert!(first.private.is_some());
    }

    #[test]
    fn a_single_item_test_set_has_no_private_score() {
        // Given one item: the split leaves the private part empty
        let l = labels("id,label\na,cat\n");
        let partition = Partition::PublicPrivate {
            private_keys: vec![],
            fraction: 0.0,
            seed: 1,
        };
        // When it is scored
        let got = score(&l, r#"{"a": "cat"}"#, &partition, Metric::Accuracy).unwrap();
        // Then only the public part has a score
        assert_eq!(
            got,
            Scores {
                public: 1.0,
                private: None
            }
        );
    }

    #[test]
    fn predictions_that_are_not_json_fail_with_the_parser_s_reason() {
        // Given predictions that are not JSON
        let l = labels(CLS_3);
        // When they are scored
        let err = score(&l, "{not json", &Partition::Whole, Metric::Accuracy).unwrap_err();
        // Then the reason says so, as the participant will read it
        assert!(
            err.to_string()
                .starts_with("predictions are not valid JSON: "),
            "{err}"
        );
    }

    #[test]
    fn predictions_of_the_wrong_shape_fail_before_any_metric() {
        // Given a list of the wrong length
        let l = labels(CLS_3);
        // When it is scored
        let err = score(&l, "[1, 2]", &Partition::Whole, Metric::Accuracy).unwrap_err();
        // Then the reason names both counts
        assert_eq!(
            err.to_string(),
            "predictions have 2 items, the test set has 3"
        );
    }

    #[test]
    fn a_failing_public_part_is_reported_before_the_private_part() {
        // Given a regression set whose public item is predicted with text
        let l = labels("id,y\na,1\nb,2\n");
        let partition = Partition::PublicPrivate {
            private_keys: strings(&["b"]),
            fraction: 0.5,
            seed: 1,
        };
        // When both parts fail
        let err = score(&l, r#"{"a": "x", "b": "y"}"#, &partition, Metric::Mse).unwrap_err();
        // Then the public item's reason is the one given
        assert_eq!(
            err.to_string(),
            "the prediction for `a` is not a finite number: `x` (MSE needs numbers)"
        );
    }

    const CLS_3: &str = test_support::CLS;
}
