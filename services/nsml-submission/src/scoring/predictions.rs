//! What a submit session's `infer` returned, in any shape an NSML competition used, normalised to
//! key → predicted value.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::ScoreError;
use super::labels::Labels;

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
        ItemShape::Record => records(list, labels, keys),
        ItemShape::Pair => pairs(list, keys),
        ItemShape::Scalar => positional(list.iter(), list.len(), keys),
        ItemShape::Other => Err(ScoreError::BadValue {
            key: keys.first().cloned().unwrap_or_default(),
            got: kind(first),
        }),
    }
}

/// A list of records (dicts): the key and value fields are those of the first record.
fn records(
    list: &[Value],
    labels: &Labels,
    keys: &[String],
) -> Result<HashMap<String, String>, ScoreError> {
    let Some(Value::Object(first)) = list.first() else {
        unreachable!("the caller read the shape from the first item");
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
            unreachable!("the caller checked every item has the first item's shape");
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

/// A list of pairs: `[key, value]` when every first element is a string or a test key, otherwise
/// `[confidence, value]` in label-file order.
fn pairs(list: &[Value], keys: &[String]) -> Result<HashMap<String, String>, ScoreError> {
    let pair = |v: &'_ Value| -> (Value, Value) {
        match v {
            Value::Array(p) => (p[0].clone(), p[1].clone()),
            _ => unreachable!("the caller checked every item has the first item's shape"),
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
pub(crate) fn canonical_number(f: f64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::metrics::{Metric, compute};
    use crate::scoring::test_support::{CLS, close, labels, map};
    use serde_json::json;

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
        let wer = compute(Metric::Wer, &l.to_map(), &p, &l.keys()).unwrap();
        assert!(close(wer, 1.0 / 4.0));
    }
}
