//! The trusted scorer: compares what a submit session's `infer` returned with the hidden test labels.
//!
//! It runs in the submission service, outside any sandbox, and never executes participant code. Everything here is
//! pure except [`run_eval_script`], which runs a host-provided evaluation script for datasets whose metric is
//! `custom`. The flow for one submit:
//!
//! 1. [`parse_labels`] reads the dataset's labels file (`KEY,LABEL` CSV with a header) into [`Labels`];
//! 2. [`normalize_predictions`] turns the predictions JSON, in any shape an NSML competition used, into
//!    key → predicted value;
//! 3. [`split`] divides the test keys into the public and the private part, deterministically;
//! 4. [`score`] computes the dataset's [`Metric`] on each part.
//!
//! Every [`ScoreError`] message is written for the participant: it becomes the submit's failure reason. None of
//! them quotes a label value, so a crafted prediction cannot read the hidden labels back through an error.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nsml_proto::v1::Direction;
use serde_json::Value;

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

/// A parsed labels file: the header's two first column names and the items in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// Name of the first column (the item key), e.g. `filename`; prediction records may use it as their key field.
    pub key_column: String,
    /// Name of the second column (the label), e.g. `text`; prediction records may use it as their value field.
    pub value_column: String,
    /// `(key, label)` in file order; keys are unique.
    pub items: Vec<(String, String)>,
}

impl Labels {
    /// Returns the item keys in file order.
    pub fn keys(&self) -> Vec<String> {
        self.items.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Returns key → label.
    pub fn to_map(&self) -> HashMap<String, String> {
        self.items.iter().cloned().collect()
    }

    /// Returns the number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the file lists no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Parses a labels file: CSV (RFC 4180 quoting, `\n` or `\r\n`, an optional UTF-8 BOM) with a header row; the first
/// column is the item key, the second the label, further columns are ignored. Keys and labels are trimmed of
/// surrounding whitespace; blank lines are skipped. Keys must be non-empty and unique, and there must be at least
/// one item.
pub fn parse_labels(csv: &str) -> Result<Labels, ScoreError> {
    let csv = csv.strip_prefix('\u{feff}').unwrap_or(csv);
    let records = parse_csv(csv)?;
    let mut records = records
        .into_iter()
        .filter(|(_, fields)| !(fields.len() == 1 && fields[0].trim().is_empty()));
    let Some((_, header)) = records.next() else {
        return Err(ScoreError::Labels("the file is empty".into()));
    };
    if header.len() < 2 {
        return Err(ScoreError::Labels(format!(
            "the header needs at least two columns (key, label), got `{}`",
            header.join(",")
        )));
    }
    let key_column = header[0].trim().to_string();
    let value_column = header[1].trim().to_string();
    let mut seen = HashSet::new();
    let mut items = Vec::new();
    for (line, fields) in records {
        if fields.len() < 2 {
            return Err(ScoreError::Labels(format!(
                "line {line} has {} field(s), expected at least 2",
                fields.len()
            )));
        }
        let key = fields[0].trim().to_string();
        if key.is_empty() {
            return Err(ScoreError::Labels(format!("line {line} has an empty key")));
        }
        if !seen.insert(key.clone()) {
            return Err(ScoreError::Labels(format!(
                "line {line} repeats the key `{key}`"
            )));
        }
        items.push((key, fields[1].trim().to_string()));
    }
    if items.is_empty() {
        return Err(ScoreError::Labels(
            "the file has a header but no items".into(),
        ));
    }
    Ok(Labels {
        key_column,
        value_column,
        items,
    })
}

/// Splits CSV text into records, each with the 1-based line it starts on.
fn parse_csv(text: &str) -> Result<Vec<(usize, Vec<String>)>, ScoreError> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let mut start_line = 1;
    let mut in_quotes = false;
    // Whether the current record has any content yet (to skip the empty record after a final newline).
    let mut dirty = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.trim().is_empty() => {
                field.clear();
                in_quotes = true;
                dirty = true;
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                dirty = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                records.push((start_line, std::mem::take(&mut fields)));
                line += 1;
                start_line = line;
                dirty = false;
            }
            _ => {
                field.push(c);
                dirty = true;
            }
        }
    }
    if in_quotes {
        return Err(ScoreError::Labels(format!(
            "line {start_line} has an unterminated quoted field"
        )));
    }
    if dirty {
        fields.push(field);
        records.push((start_line, fields));
    }
    Ok(records)
}

/// Fields that name the test item in prediction records, after the labels file's own key column.
const KEY_FIELDS: [&str; 3] = ["id", "filename", "key"];
/// Fields that hold the predicted value in prediction records, after the labels file's own label column.
const VALUE_FIELDS: [&str; 6] = ["label", "y", "y_pred", "pred", "prediction", "text"];

/// Normalises what `infer` returned (JSON) to key → predicted value, checked against the test items of `labels`.
///
/// Accepted shapes (each NSML competition used its own):
/// - a dict `{key: value}`;
/// - a list of `[key, value]` pairs;
/// - a list of records (dicts) with a key field (the labels file's first column name, `id`, `filename` or `key`)
///   and a value field (the labels file's second column name, `label`, `y`, `y_pred`, `pred`, `prediction` or
///   `text`), e.g. `[{"filename": "a.wav", "text": "..."}]`; the first of each list present in the first record
///   is used;
/// - the same as columns, a dict of two equally long lists (`{"filename": [...], "y_pred": [...]}`);
/// - a plain list of values in label-file order (its length must match);
/// - a list of `[confidence, value]` pairs in label-file order (the 2018 style `list(zip(confidences, preds))`):
///   a pair list whose first elements are not all test keys is read this way.
///
/// Keys may be strings or numbers (`17` matches the key `17`). Values may be strings, numbers or booleans
/// (`true` = `1`); numbers are written canonically (`1.0` becomes `1`). Every test item must be predicted exactly
/// once, and no other item may be.
pub fn normalize_predictions(
    pred: &Value,
    labels: &Labels,
) -> Result<HashMap<String, String>, ScoreError> {
    let keys = labels.keys();
    match pred {
        Value::Object(obj) => {
            if let Some((kf, vf)) = columnar_fields(obj, labels) {
                let (Some(Value::Array(ks)), Some(Value::Array(vs))) = (obj.get(kf), obj.get(vf))
                else {
                    unreachable!("columnar_fields checked both are lists");
                };
                if ks.len() != vs.len() {
                    return Err(ScoreError::Count {
                        got: vs.len(),
                        want: ks.len(),
                    });
                }
                let pairs = ks
                    .iter()
                    .zip(vs)
                    .enumerate()
                    .map(|(i, (k, v))| Ok((key_of(k, i)?, v)))
                    .collect::<Result<Vec<_>, ScoreError>>()?;
                return keyed(pairs, &keys);
            }
            let pairs = obj.iter().map(|(k, v)| (k.trim().to_string(), v)).collect();
            keyed(pairs, &keys)
        }
        Value::Array(list) => normalize_list(list, labels, &keys),
        other => Err(ScoreError::Shape { got: kind(other) }),
    }
}

fn normalize_list(
    list: &[Value],
    labels: &Labels,
    keys: &[String],
) -> Result<HashMap<String, String>, ScoreError> {
    let Some(first) = list.first() else {
        return Err(ScoreError::Count {
            got: 0,
            want: keys.len(),
        });
    };
    let shape = item_shape(first);
    if let Some((index, other)) = list
        .iter()
        .enumerate()
        .find(|(_, v)| item_shape(v) != shape)
    {
        return Err(ScoreError::MixedShapes {
            first: shape.name(first),
            index,
            other: item_shape(other).name(other),
        });
    }
    match shape {
        ItemShape::Record => {
            let Some(Value::Object(first)) = list.first() else {
                unreachable!("the shape was read from the first item");
            };
            let key_candidates = candidates(&labels.key_column, &KEY_FIELDS, None);
            let kf = key_candidates
                .iter()
                .find(|f| first.contains_key(**f))
                .ok_or_else(|| ScoreError::NoKeyField {
                    candidates: quoted(&key_candidates),
                    found: fields_of(first),
                })?;
            let value_candidates = candidates(&labels.value_column, &VALUE_FIELDS, Some(kf));
            let vf = value_candidates
                .iter()
                .find(|f| first.contains_key(**f))
                .ok_or_else(|| ScoreError::NoValueField {
                    candidates: quoted(&value_candidates),
                    found: fields_of(first),
                })?;
            let mut pairs = Vec::with_capacity(list.len());
            for (index, item) in list.iter().enumerate() {
                let Value::Object(rec) = item else {
                    unreachable!("every item has the first item's shape");
                };
                let field = |f: &str| {
                    rec.get(f).ok_or_else(|| ScoreError::MissingField {
                        index,
                        field: f.to_string(),
                    })
                };
                pairs.push((key_of(field(kf)?, index)?, field(vf)?));
            }
            keyed(pairs, keys)
        }
        ItemShape::Pair => {
            let pair = |v: &'_ Value| -> (Value, Value) {
                match v {
                    Value::Array(p) => (p[0].clone(), p[1].clone()),
                    _ => unreachable!("every item has the first item's shape"),
                }
            };
            let pairs: Vec<(Value, Value)> = list.iter().map(pair).collect();
            let key_set: HashSet<&str> = keys.iter().map(String::as_str).collect();
            let all_strings = pairs.iter().all(|(k, _)| k.is_string());
            let all_keys = pairs
                .iter()
                .enumerate()
                .all(|(i, (k, _))| key_of(k, i).is_ok_and(|k| key_set.contains(k.as_str())));
            if all_strings || all_keys {
                let keyed_pairs = pairs
                    .iter()
                    .enumerate()
                    .map(|(i, (k, v))| Ok((key_of(k, i)?, v)))
                    .collect::<Result<Vec<_>, ScoreError>>()?;
                keyed(keyed_pairs, keys)
            } else {
                // `[confidence, value]` in label-file order.
                positional(pairs.iter().map(|(_, v)| v), list.len(), keys)
            }
        }
        ItemShape::Scalar => positional(list.iter(), list.len(), keys),
        ItemShape::Other => Err(ScoreError::BadValue {
            key: keys.first().cloned().unwrap_or_default(),
            got: kind(first),
        }),
    }
}

/// The shape of one item of a predictions list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemShape {
    Record,
    Pair,
    Scalar,
    Other,
}

impl ItemShape {
    fn name(self, v: &Value) -> &'static str {
        match self {
            ItemShape::Record => "a dict",
            ItemShape::Pair => "a pair",
            ItemShape::Scalar | ItemShape::Other => kind(v),
        }
    }
}

fn item_shape(v: &Value) -> ItemShape {
    match v {
        Value::Object(_) => ItemShape::Record,
        Value::Array(p) if p.len() == 2 => ItemShape::Pair,
        Value::String(_) | Value::Number(_) | Value::Bool(_) => ItemShape::Scalar,
        _ => ItemShape::Other,
    }
}

/// The field names to look for: the labels file's own column first, then the usual ones.
fn candidates<'a>(own: &'a str, usual: &[&'a str], except: Option<&str>) -> Vec<&'a str> {
    let mut out = Vec::new();
    for f in std::iter::once(own).chain(usual.iter().copied()) {
        if !f.is_empty() && Some(f) != except && !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// For a dict of columns, the key and value fields when both hold lists.
fn columnar_fields<'a>(
    obj: &serde_json::Map<String, Value>,
    labels: &'a Labels,
) -> Option<(&'a str, &'a str)> {
    let is_list = |f: &str| obj.get(f).is_some_and(Value::is_array);
    let kf = *candidates(&labels.key_column, &KEY_FIELDS, None)
        .iter()
        .find(|f| is_list(f))?;
    let vf = *candidates(&labels.value_column, &VALUE_FIELDS, Some(kf))
        .iter()
        .find(|f| is_list(f))?;
    Some((kf, vf))
}

fn quoted(fields: &[&str]) -> String {
    let q: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
    q.join(", ")
}

fn fields_of(rec: &serde_json::Map<String, Value>) -> String {
    if rec.is_empty() {
        "no fields".into()
    } else {
        quoted(&rec.keys().map(String::as_str).collect::<Vec<_>>())
    }
}

/// Names a JSON value's kind for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

/// Writes a number canonically: integers without a fraction (`1.0` → `1`), others in shortest round-trip form.
fn canonical_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        // Exact: the value is an integer well inside i64's range.
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

fn number_text(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        n.as_f64()
            .map(canonical_number)
            .unwrap_or_else(|| n.to_string())
    }
}

fn key_of(v: &Value, index: usize) -> Result<String, ScoreError> {
    match v {
        Value::String(s) => Ok(s.trim().to_string()),
        Value::Number(n) => Ok(number_text(n)),
        other => Err(ScoreError::BadKey {
            index,
            got: kind(other),
        }),
    }
}

fn value_of(v: &Value, key: &str) -> Result<String, ScoreError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(number_text(n)),
        Value::Bool(b) => Ok(if *b { "1" } else { "0" }.into()),
        other => Err(ScoreError::BadValue {
            key: key.to_string(),
            got: kind(other),
        }),
    }
}

/// Predictions that name their items: checks duplicates, unknown and missing keys.
fn keyed(
    pairs: Vec<(String, &Value)>,
    keys: &[String],
) -> Result<HashMap<String, String>, ScoreError> {
    let key_set: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut out = HashMap::with_capacity(pairs.len());
    let mut unknown = Vec::new();
    for (k, v) in pairs {
        if !key_set.contains(k.as_str()) {
            unknown.push(k);
            continue;
        }
        let value = value_of(v, &k)?;
        if out.insert(k.clone(), value).is_some() {
            return Err(ScoreError::Duplicate { key: k });
        }
    }
    if let Some(example) = unknown.first() {
        return Err(ScoreError::Unknown {
            count: unknown.len(),
            example: example.clone(),
            expected: keys.first().cloned().unwrap_or_default(),
        });
    }
    let missing: Vec<&String> = keys.iter().filter(|k| !out.contains_key(*k)).collect();
    if let Some(example) = missing.first() {
        return Err(ScoreError::Missing {
            count: missing.len(),
            example: (*example).clone(),
        });
    }
    Ok(out)
}

/// Predictions in label-file order.
fn positional<'a>(
    values: impl Iterator<Item = &'a Value>,
    len: usize,
    keys: &[String],
) -> Result<HashMap<String, String>, ScoreError> {
    if len != keys.len() {
        return Err(ScoreError::Count {
            got: len,
            want: keys.len(),
        });
    }
    keys.iter()
        .zip(values)
        .map(|(k, v)| Ok((k.clone(), value_of(v, k)?)))
        .collect()
}

/// Splits the test keys into the public and the private part; both keep the order of `keys`.
///
/// With `private_keys` non-empty, exactly those keys (of the ones in `keys`) are private. Otherwise
/// `round(fraction * n)` keys are private, chosen by a seeded hash of each key: the same keys, seed and fraction
/// always give the same split, whatever the order of `keys`. When `n >= 2`, both parts keep at least one key, so a
/// fraction of 0 or 1 still leaves one item on the other side and both boards always have a score.
pub fn split(
    keys: &[String],
    private_keys: &[String],
    fraction: f64,
    seed: u64,
) -> (Vec<String>, Vec<String>) {
    let private: HashSet<&str> = if private_keys.is_empty() {
        let n = keys.len();
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let mut take = (fraction * n as f64).round() as usize;
        if n >= 2 {
            take = take.clamp(1, n - 1);
        }
        let mut order: Vec<(u64, &str)> = keys
            .iter()
            .map(|k| (seeded_hash(seed, k), k.as_str()))
            .collect();
        order.sort_unstable();
        order.into_iter().take(take).map(|(_, k)| k).collect()
    } else {
        private_keys.iter().map(String::as_str).collect()
    };
    keys.iter()
        .cloned()
        .partition(|k| !private.contains(k.as_str()))
}

/// A stable 64-bit hash of a key under a seed (FNV-1a, then the SplitMix64 finaliser), fixed forever so that a
/// dataset's split never changes between releases.
fn seeded_hash(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Scores predictions on a subset of the test keys.
///
/// Classification metrics compare normalised text (trimmed; numbers canonical, so `1`, `1.0` and `"1"` match);
/// regression metrics parse both sides as numbers; CER and WER compare trimmed text.
pub fn score(
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

fn parse_finite(s: &str) -> Option<f64> {
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

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

/// The environment variables an evaluation script keeps; everything else (tokens, the deployment's secret) is
/// cleared.
const EVAL_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "PYENV_ROOT"];

/// Runs a host-provided evaluation script as `PYTHON SCRIPT PREDICTIONS_JSON_FILE LABELS_FILE` and returns the
/// number it prints on its last non-empty stdout line (the whole line, or its last token, as in `score: 0.93`).
///
/// The two files are written to a fresh temporary directory, which is also the script's working directory and
/// `HOME`, and is removed afterwards. The environment is cleared but for `PATH` and the locale; stdin is empty.
/// Past `timeout` the script is killed. A script that exits unsuccessfully yields [`ScoreError::EvalFailed`],
/// whose stderr is for the operators' log, never for the participant.
pub async fn run_eval_script(
    python: &str,
    script: &Path,
    predictions_json: &str,
    labels_csv: &str,
    timeout: Duration,
) -> Result<f64, ScoreError> {
    let dir = tempfile::Builder::new().prefix("nsml-eval-").tempdir()?;
    let predictions = dir.path().join("predictions.json");
    let labels = dir.path().join("labels.csv");
    tokio::fs::write(&predictions, predictions_json).await?;
    tokio::fs::write(&labels, labels_csv).await?;
    let script = std::path::absolute(script)?;

    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(&script)
        .arg(&predictions)
        .arg(&labels)
        .current_dir(dir.path())
        .env_clear()
        .env("HOME", dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONIOENCODING", "utf-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in EVAL_ENV {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let child = cmd.spawn()?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out?,
        // Dropping the future drops the child, which kills it (`kill_on_drop`).
        Err(_) => {
            return Err(ScoreError::EvalTimeout {
                secs: timeout.as_secs_f64().ceil() as u64,
            });
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = {
            let chars: Vec<char> = stderr.chars().collect();
            chars[chars.len().saturating_sub(4000)..].iter().collect()
        };
        return Err(ScoreError::EvalFailed {
            status: output.status.to_string(),
            stderr: tail,
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    let number = parse_finite(line).or_else(|| {
        line.rsplit(|c: char| c.is_whitespace() || c == ':' || c == '=')
            .find(|t| !t.is_empty())
            .and_then(parse_finite)
    });
    number.ok_or_else(|| ScoreError::EvalOutput {
        line: truncate(line, 80),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(csv: &str) -> Labels {
        parse_labels(csv).expect("valid labels")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn map(v: &[(&str, &str)]) -> HashMap<String, String> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Scores `preds` against `labels` over every key.
    fn score_all(metric: Metric, labels: &[(&str, &str)], preds: &[(&str, &str)]) -> f64 {
        let keys: Vec<String> = labels.iter().map(|(k, _)| k.to_string()).collect();
        score(metric, &map(labels), &map(preds), &keys).expect("scores")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    const CLS: &str = "id,label\na,cat\nb,dog\nc,cat\n";

    // --- metrics -------------------------------------------------------------------------------------------

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
        let err = score(
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
            score(Metric::Accuracy, &l, &p, &strings(&["a"])).unwrap(),
            1.0
        );
        assert_eq!(
            score(Metric::Accuracy, &l, &p, &strings(&["b"])).unwrap(),
            0.0
        );
    }

    #[test]
    fn score_errors() {
        let l = map(&[("a", "1"), ("b", "x")]);
        let p = map(&[("a", "oops"), ("b", "2")]);
        let err = score(Metric::Mse, &l, &p, &strings(&["a"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the prediction for `a` is not a finite number: `oops` (MSE needs numbers)"
        );
        let err = score(Metric::Mae, &l, &p, &strings(&["b"])).unwrap_err();
        assert!(matches!(err, ScoreError::LabelNotNumber { .. }), "{err}");
        assert!(
            !err.to_string().contains("`x`"),
            "a label leaked into the reason: {err}"
        );
        let nan = map(&[("a", "NaN"), ("b", "1")]);
        assert!(matches!(
            score(Metric::Rmse, &l, &nan, &strings(&["a"])).unwrap_err(),
            ScoreError::NotNumber { .. }
        ));
        assert!(matches!(
            score(Metric::Accuracy, &l, &p, &[]).unwrap_err(),
            ScoreError::Empty
        ));
        let err = score(Metric::Accuracy, &l, &map(&[]), &strings(&["a", "b"])).unwrap_err();
        assert_eq!(err.to_string(), "no prediction for 2 test items, e.g. `a`");
        let err = score(Metric::Accuracy, &l, &p, &strings(&["zz"])).unwrap_err();
        assert!(matches!(err, ScoreError::NoLabel { .. }), "{err}");
    }

    // --- labels --------------------------------------------------------------------------------------------

    #[test]
    fn labels_keep_header_names_and_file_order() {
        let l = labels("filename,text\r\nb.wav,안녕\r\na.wav, hello \r\n\r\n");
        assert_eq!(l.key_column, "filename");
        assert_eq!(l.value_column, "text");
        assert_eq!(l.keys(), strings(&["b.wav", "a.wav"]));
        assert_eq!(l.to_map()["a.wav"], "hello");
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn labels_read_quoted_fields_bom_and_extra_columns() {
        let l = labels(
            "\u{feff}id,text,speaker\n1,\"hello, world\",x\n2,\"she said \"\"hi\"\"\ntwice\",y\n3,plain",
        );
        assert_eq!(l.key_column, "id");
        assert_eq!(
            l.items,
            vec![
                ("1".into(), "hello, world".into()),
                ("2".into(), "she said \"hi\"\ntwice".into()),
                ("3".into(), "plain".into()),
            ]
        );
    }

    #[test]
    fn labels_errors() {
        let err = |csv: &str| parse_labels(csv).unwrap_err().to_string();
        assert_eq!(err(""), "invalid labels file: the file is empty");
        assert_eq!(err("\n\n"), "invalid labels file: the file is empty");
        assert_eq!(
            err("id\n1\n"),
            "invalid labels file: the header needs at least two columns (key, label), got `id`"
        );
        assert_eq!(
            err("id,label\n"),
            "invalid labels file: the file has a header but no items"
        );
        assert_eq!(
            err("id,label\n1,a\n2\n"),
            "invalid labels file: line 3 has 1 field(s), expected at least 2"
        );
        assert_eq!(
            err("id,label\n1,a\n1,b\n"),
            "invalid labels file: line 3 repeats the key `1`"
        );
        assert_eq!(
            err("id,label\n,a\n"),
            "invalid labels file: line 2 has an empty key"
        );
        assert_eq!(
            err("id,label\n1,\"open\n"),
            "invalid labels file: line 2 has an unterminated quoted field"
        );
    }

    // --- prediction shapes ---------------------------------------------------------------------------------

    fn norm(pred: Value, csv: &str) -> Result<HashMap<String, String>, ScoreError> {
        normalize_predictions(&pred, &labels(csv))
    }

    fn expected_cls() -> HashMap<String, String> {
        map(&[("a", "cat"), ("b", "dog"), ("c", "cat")])
    }

    #[test]
    fn dict_of_key_to_value() {
        let got = norm(json!({"c": "cat", "a": "cat", "b": "dog"}), CLS).unwrap();
        assert_eq!(got, expected_cls());
    }

    #[test]
    fn list_of_key_value_pairs() {
        let got = norm(json!([["b", "dog"], ["a", "cat"], ["c", "cat"]]), CLS).unwrap();
        assert_eq!(got, expected_cls());
    }

    #[test]
    fn pairs_with_numeric_keys_are_keyed_when_every_key_is_a_test_key() {
        let got = norm(json!([[2, 0], [1, 1]]), "id,label\n1,1\n2,0\n").unwrap();
        assert_eq!(got, map(&[("1", "1"), ("2", "0")]));
    }

    #[test]
    fn list_of_confidence_value_pairs_in_label_order() {
        // NSML 2018: `list(zip(confidences, predictions))`.
        let got = norm(json!([[0.9, "cat"], [0.6, "dog"], [0.55, "cat"]]), CLS).unwrap();
        assert_eq!(got, expected_cls());
        let got = norm(
            json!([[[0.1, 0.9], 1], [[0.8, 0.2], 0]]),
            "id,label\nx,1\ny,0\n",
        )
        .unwrap();
        assert_eq!(got, map(&[("x", "1"), ("y", "0")]));
    }

    #[test]
    fn records_with_the_usual_field_names() {
        let got = norm(
            json!([{"id": "a", "label": "cat"}, {"id": "b", "label": "dog"}, {"id": "c", "label": "cat"}]),
            CLS,
        )
        .unwrap();
        assert_eq!(got, expected_cls());
        // AI RUSH style: `filename`, `y_pred`, against a labels file with other column names.
        let got = norm(
            json!([{"filename": "a", "y_pred": 1}, {"filename": "b", "y_pred": 0.0}]),
            "image,class\na,1\nb,0\n",
        )
        .unwrap();
        assert_eq!(got, map(&[("a", "1"), ("b", "0")]));
    }

    #[test]
    fn records_with_the_label_files_own_column_names() {
        // 2022 speech: `[{'filename': ..., 'text': ...}]`, and a custom header.
        let got = norm(
            json!([{"filename": "b.wav", "text": "둘"}, {"filename": "a.wav", "text": "하나"}]),
            "filename,text\na.wav,하나\nb.wav,둘\n",
        )
        .unwrap();
        assert_eq!(got, map(&[("a.wav", "하나"), ("b.wav", "둘")]));
        let got = norm(
            json!([{"img": "p", "species": "fir", "label": "ignored"}]),
            "img,species\np,fir\n",
        )
        .unwrap();
        assert_eq!(got, map(&[("p", "fir")]));
    }

    #[test]
    fn dict_of_columns() {
        let got = norm(
            json!({"filename": ["b", "a", "c"], "y_pred": ["dog", "cat", "cat"]}),
            CLS,
        )
        .unwrap();
        assert_eq!(got, expected_cls());
    }

    #[test]
    fn plain_list_in_label_order() {
        let got = norm(json!(["cat", "dog", "cat"]), CLS).unwrap();
        assert_eq!(got, expected_cls());
        let got = norm(json!([1.0, 2.5, true]), CLS).unwrap();
        assert_eq!(got, map(&[("a", "1"), ("b", "2.5"), ("c", "1")]));
    }

    #[test]
    fn wrong_shape() {
        let err = norm(json!("cat,dog"), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "predictions must be a list or a dict, got a string"
        );
        let err = norm(json!(null), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "predictions must be a list or a dict, got null"
        );
        let err = norm(json!(["cat", {"id": "b"}, "cat"]), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "predictions mix shapes: item 0 is a string, item 1 is a dict"
        );
        let err = norm(json!([null, null, null]), CLS).unwrap_err();
        assert!(
            matches!(err, ScoreError::BadValue { got: "null", .. }),
            "{err}"
        );
        let err = norm(json!({"a": ["cat"], "b": "dog", "c": "cat"}), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the prediction for `a` must be a number or a string, got a list"
        );
    }

    #[test]
    fn wrong_count() {
        let labels_csv = format!(
            "id,label\n{}",
            (1..=20).map(|i| format!("id-{i},0\n")).collect::<String>()
        );
        let err = norm(json!(vec![0; 18]), &labels_csv).unwrap_err();
        assert_eq!(
            err.to_string(),
            "predictions have 18 items, the test set has 20"
        );
        let err = norm(json!([]), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "predictions have 0 items, the test set has 3"
        );
        let err = norm(json!([[0.9, "cat"]]), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "predictions have 1 item, the test set has 3"
        );
        let err = norm(json!({"id": ["a", "b"], "label": ["cat"]}), CLS).unwrap_err();
        assert!(
            matches!(err, ScoreError::Count { got: 1, want: 2 }),
            "{err}"
        );
    }

    #[test]
    fn missing_keys() {
        let labels_csv = format!(
            "id,label\n{}",
            (1..=20).map(|i| format!("id-{i},0\n")).collect::<String>()
        );
        let preds: serde_json::Map<String, Value> = (1..=20)
            .filter(|i| ![17, 18, 19].contains(i))
            .map(|i| (format!("id-{i}"), json!(0)))
            .collect();
        let err = norm(Value::Object(preds), &labels_csv).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no prediction for 3 test items, e.g. `id-17`"
        );
    }

    #[test]
    fn unknown_keys() {
        let err = norm(
            json!({"a": "cat", "b": "dog", "c": "cat", "zz": "cat"}),
            CLS,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "predictions name 1 item not in the test set, e.g. `zz` (test items look like `a`)"
        );
        let err = norm(json!([["x.wav", "a"], ["y.wav", "b"]]), CLS).unwrap_err();
        assert!(matches!(err, ScoreError::Unknown { count: 2, .. }), "{err}");
    }

    #[test]
    fn duplicate_keys() {
        let err = norm(json!([["a", "cat"], ["a", "dog"], ["b", "dog"]]), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the test item `a` is predicted more than once"
        );
    }

    #[test]
    fn record_errors() {
        let err = norm(json!([{"name": "a", "label": "cat"}]), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "prediction records need a field naming the test item (`id`, `filename`, `key`); \
             the first record has `label`, `name`"
        );
        let err = norm(json!([{"id": "a", "score": 1}]), CLS).unwrap_err();
        assert!(matches!(err, ScoreError::NoValueField { .. }), "{err}");
        assert!(err.to_string().contains("`label`, `y`, `y_pred`"), "{err}");
        let err = norm(json!([{"id": "a", "label": "cat"}, {"id": "b"}]), CLS).unwrap_err();
        assert_eq!(err.to_string(), "prediction 1 has no `label` field");
        let err = norm(json!([{"id": ["a"], "label": "cat"}]), CLS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "prediction 0 names its test item with a list; use a string or a number"
        );
    }

    #[test]
    fn normalized_predictions_score_end_to_end() {
        let l = labels("filename,text\na.wav,hello world\nb.wav,good night\n");
        let p = normalize_predictions(
            &json!([{"filename": "a.wav", "text": "hello word"}, {"filename": "b.wav", "text": "good night"}]),
            &l,
        )
        .unwrap();
        let wer = score(Metric::Wer, &l.to_map(), &p, &l.keys()).unwrap();
        assert!(close(wer, 1.0 / 4.0));
    }

    // --- split ---------------------------------------------------------------------------------------------

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("item-{i:03}")).collect()
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let k = keys(100);
        let (public, private) = split(&k, &[], 0.3, 42);
        assert_eq!(private.len(), 30);
        assert_eq!(public.len(), 70);
        assert_eq!(split(&k, &[], 0.3, 42), (public.clone(), private.clone()));
        let p: HashSet<&String> = private.iter().collect();
        assert!(public.iter().all(|k| !p.contains(k)));
        let mut all: Vec<String> = public.iter().chain(&private).cloned().collect();
        all.sort();
        assert_eq!(all, k);
        // Both parts keep the keys' order.
        assert!(public.windows(2).all(|w| w[0] < w[1]));
        assert!(private.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn split_does_not_depend_on_key_order_but_on_the_seed() {
        let k = keys(50);
        let mut reversed = k.clone();
        reversed.reverse();
        let (_, a) = split(&k, &[], 0.5, 7);
        let (_, mut b) = split(&reversed, &[], 0.5, 7);
        b.reverse();
        assert_eq!(a, b);
        let (_, c) = split(&k, &[], 0.5, 8);
        assert_ne!(a, c);
    }

    #[test]
    fn split_rounds_and_keeps_both_parts_non_empty() {
        let k = keys(5);
        assert_eq!(split(&k, &[], 0.5, 1).1.len(), 3); // round(2.5) = 3
        assert_eq!(split(&k, &[], 0.1, 1).1.len(), 1); // round(0.5) = 1
        for fraction in [0.0, 1.0, f64::NAN, -3.0, 7.0] {
            let (public, private) = split(&keys(2), &[], fraction, 1);
            assert_eq!((public.len(), private.len()), (1, 1), "fraction {fraction}");
        }
        assert_eq!(
            split(&keys(1), &[], 0.5, 1).0.len() + split(&keys(1), &[], 0.5, 1).1.len(),
            1
        );
        assert_eq!(split(&[], &[], 0.5, 1), (vec![], vec![]));
    }

    #[test]
    fn split_with_listed_private_keys() {
        let k = strings(&["a", "b", "c", "d"]);
        let (public, private) = split(&k, &strings(&["d", "b", "not-a-key"]), 0.9, 1);
        assert_eq!(public, strings(&["a", "c"]));
        assert_eq!(private, strings(&["b", "d"]));
    }

    // --- evaluation scripts --------------------------------------------------------------------------------

    /// The Python interpreter on this machine, if any (the eval tests are skipped without one).
    fn python() -> Option<String> {
        let found = std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        found.then(|| "python3".to_string())
    }

    fn write_script(dir: &Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("evaluate.py");
        std::fs::write(&path, body).unwrap();
        path
    }

    const EVAL: &str = r#"
import json, sys, csv, os
assert not [k for k in os.environ if k.startswith("CARGO")], "the environment was not cleared"
assert os.path.realpath(os.environ["HOME"]) == os.path.realpath(os.getcwd())
preds = json.load(open(sys.argv[1]))
with open(sys.argv[2]) as f:
    rows = list(csv.reader(f))[1:]
labels = {k: v for k, v in rows}
hits = sum(1 for k, v in preds.items() if labels.get(k) == v)
print("scoring", len(labels), "items")
print(hits / len(labels))
print()
"#;

    #[tokio::test]
    async fn eval_script_prints_the_score() {
        let Some(py) = python() else {
            eprintln!("no python3: skipped");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let script = write_script(dir.path(), EVAL);
        let score = run_eval_script(
            &py,
            &script,
            r#"{"a": "cat", "b": "cat", "c": "cat", "d": "x"}"#,
            "id,label\na,cat\nb,dog\nc,cat\nd,bird\n",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(close(score, 0.5));
    }

    #[tokio::test]
    async fn eval_script_score_with_a_prefix() {
        let Some(py) = python() else { return };
        let dir = tempfile::tempdir().unwrap();
        let script = write_script(dir.path(), "print('Score: 0.25')\n");
        let score = run_eval_script(&py, &script, "[]", "id,l\n", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(close(score, 0.25));
    }

    #[tokio::test]
    async fn eval_script_failures() {
        let Some(py) = python() else { return };
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_secs(30);

        let script = write_script(
            dir.path(),
            "import sys\nprint('label of a is cat', file=sys.stderr)\nsys.exit(3)\n",
        );
        let err = run_eval_script(&py, &script, "{}", "id,l\n", timeout)
            .await
            .unwrap_err();
        let ScoreError::EvalFailed { ref stderr, .. } = err else {
            panic!("expected a failure, got {err}");
        };
        assert!(stderr.contains("label of a is cat"));
        assert!(
            !err.to_string().contains("cat"),
            "stderr leaked into the reason: {err}"
        );

        let script = write_script(dir.path(), "print('done')\n");
        let err = run_eval_script(&py, &script, "{}", "id,l\n", timeout)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the evaluation script printed no score: its last line was `done`"
        );

        let script = write_script(dir.path(), "print(float('nan'))\n");
        let err = run_eval_script(&py, &script, "{}", "id,l\n", timeout)
            .await
            .unwrap_err();
        assert!(matches!(err, ScoreError::EvalOutput { .. }), "{err}");

        let script = write_script(dir.path(), "import time\ntime.sleep(30)\n");
        let started = std::time::Instant::now();
        let err = run_eval_script(&py, &script, "{}", "id,l\n", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the evaluation script did not finish within 1 seconds"
        );
        assert!(started.elapsed() < Duration::from_secs(10));

        let err = run_eval_script("/nonexistent/python3", &script, "{}", "id,l\n", timeout)
            .await
            .unwrap_err();
        assert!(matches!(err, ScoreError::EvalIo(_)), "{err}");
    }
}
