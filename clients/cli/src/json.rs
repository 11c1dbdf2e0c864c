//! The `-j/--json` output: API messages as the platform prints them as JSON ([`nsml_proto::json`]: snake_case
//! fields named as in the protos, enums as lowercase words, times as milliseconds since the epoch (`*_ms`),
//! summaries as JSON objects), with NSML's own words where the CLI has them.

use nsml_proto::json::to_value;
use nsml_proto::v1 as pb;
use serde_json::Value;

use crate::output::{kind_name, session_status, status_name};

pub fn session(s: &pb::Session) -> Value {
    let mut v = to_value(s);
    // NSML's words for the kinds, and the status as `ps` shows it beside the state.
    v["kind"] = kind_name(s.kind()).into();
    v["status"] = status_name(s.status()).to_ascii_lowercase().into();
    v["status_label"] = session_status(s).into();
    v
}

pub fn checkpoint(c: &pb::Checkpoint) -> Value {
    to_value(c)
}

/// A dataset with its description's fields at the top, as `nsml dataset ls` lists them.
pub fn dataset(d: &pb::Dataset) -> Value {
    let mut v = to_value(d);
    if let Some(Value::Object(meta)) = v.as_object_mut().and_then(|o| o.remove("meta")) {
        for (key, value) in meta {
            v[key] = value;
        }
    }
    v
}

pub fn board(b: &pb::BoardResponse) -> Value {
    to_value(b)
}

pub fn overall(o: &pb::OverallResponse) -> Value {
    to_value(o)
}

pub fn history_entry(e: &pb::HistoryEntry) -> Value {
    to_value(e)
}

pub fn identity(i: &pb::Identity) -> Value {
    to_value(i)
}

pub fn competition(c: &pb::Competition) -> Value {
    to_value(c)
}

/// Prints a JSON value, pretty, followed by a newline.
pub fn print(value: &Value) {
    // Serializing a `Value` cannot fail: its map keys are strings.
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_carry_status_kind_and_summary_as_json() {
        let s = pb::Session {
            name: "demo/t1-cls/3".into(),
            kind: pb::SessionKind::TrialSubmit as i32,
            status: pb::SessionStatus::Failed as i32,
            exit_code: 137,
            reason: "Killed (out of memory: limit 24G)".into(),
            summary_json: r#"{"acc":0.5}"#.into(),
            ..Default::default()
        };
        let v = session(&s);
        assert_eq!(v["kind"], "trial");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["status_label"], "Failed (exit 137)");
        assert_eq!(v["reason"], "Killed (out of memory: limit 24G)");
        assert_eq!(v["summary"]["acc"], 0.5);
        assert_eq!(session(&pb::Session::default())["summary"], Value::Null);
    }

    #[test]
    fn a_dataset_lists_its_description_at_the_top() {
        let d = pb::Dataset {
            meta: Some(pb::DatasetMeta {
                name: "t1-cls".into(),
                metric: "macro_f1".into(),
                direction: pb::Direction::Descending as i32,
                ..Default::default()
            }),
            size_bytes: 4096,
            ..Default::default()
        };
        let v = dataset(&d);
        assert_eq!(v["name"], "t1-cls");
        assert_eq!(v["metric"], "macro_f1");
        assert_eq!(v["direction"], "descending");
        assert_eq!(v["size_bytes"], 4096);
        assert!(v.get("meta").is_none());
    }
}
