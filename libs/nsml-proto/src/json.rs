//! The platform's messages as JSON, in one convention for every tool that prints them (`nsml … -j`, the
//! ledger's audit): fields named as in the protos, 64-bit integers as numbers (times are `*_ms`), enum values
//! as lowercase words without their type's prefix (`SESSION_STATUS_FAILED` → `failed`), and a string field
//! `X_json` that holds JSON text (a summary) as the object `X`.
//!
//! It reads the messages' descriptors, generated from `proto/` with the code, so a field added to a proto
//! appears in the JSON without a line written here.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MapKey, ReflectMessage, Value as Field};
use serde_json::{Map, Value};

static POOL: LazyLock<Option<DescriptorPool>> =
    LazyLock::new(|| DescriptorPool::decode(crate::v1::FILE_DESCRIPTOR_SET).ok());

/// `msg` as JSON, by the convention in the module documentation.
pub fn to_value<M: prost::Message + prost::Name>(msg: &M) -> Value {
    let decoded = POOL
        .as_ref()
        .and_then(|pool| pool.get_message_by_name(&M::full_name()))
        .and_then(|desc| DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).ok());
    match decoded {
        Some(dynamic) => message(&dynamic),
        // Every generated message is in the descriptor it was generated with.
        None => Value::Null,
    }
}

fn message(msg: &DynamicMessage) -> Value {
    let mut object = Map::new();
    for field in msg.descriptor().fields() {
        let value = msg.get_field(&field);
        let name = field.name();
        match (name.strip_suffix("_json"), value.as_str()) {
            (Some(base), Some(text)) if !field.is_list() => {
                object.insert(base.to_string(), embedded(text));
            }
            _ => {
                object.insert(name.to_string(), json(&value, &field.kind()));
            }
        }
    }
    Value::Object(object)
}

fn json(value: &Field, kind: &Kind) -> Value {
    match value {
        Field::Bool(b) => Value::Bool(*b),
        Field::I32(n) => Value::from(*n),
        Field::I64(n) => Value::from(*n),
        Field::U32(n) => Value::from(*n),
        Field::U64(n) => Value::from(*n),
        Field::F32(x) => number(f64::from(*x)),
        Field::F64(x) => number(*x),
        Field::String(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(b.iter().map(|byte| format!("{byte:02x}")).collect()),
        Field::EnumNumber(n) => enum_word(kind, *n),
        Field::Message(m) => message(m),
        Field::List(items) => Value::Array(items.iter().map(|v| json(v, kind)).collect()),
        Field::Map(entries) => {
            let value_kind = match kind {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                other => other.clone(),
            };
            Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (map_key(k), json(v, &value_kind)))
                    .collect(),
            )
        }
    }
}

/// A finite number, or null (JSON has no NaN).
fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn map_key(key: &MapKey) -> String {
    match key {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

/// `SESSION_STATUS_FAILED` of `SessionStatus` → `failed`; a number no value has stays a number.
fn enum_word(kind: &Kind, number: i32) -> Value {
    let Kind::Enum(desc) = kind else {
        return Value::from(number);
    };
    let Some(value) = desc.get_value(number) else {
        return Value::from(number);
    };
    let prefix = format!("{}_", screaming_snake(desc.name()));
    let name = value.name();
    Value::String(
        name.strip_prefix(&prefix)
            .unwrap_or(name)
            .to_ascii_lowercase(),
    )
}

/// `SessionStatus` → `SESSION_STATUS`.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// JSON text a message carries (a summary): parsed, or kept as a string if it is not JSON; empty is null.
fn embedded(text: &str) -> Value {
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;

    #[test]
    fn fields_keep_their_proto_names_and_numbers_stay_numbers() {
        let session = v1::Session {
            name: "demo/t1-cls/3".into(),
            created_at_ms: 1_764_000_000_000,
            resources: Some(v1::Resources {
                gpus: 1,
                cpus: 4,
                memory_bytes: 24 << 30,
                shm_bytes: 1 << 30,
            }),
            ..Default::default()
        };
        let v = to_value(&session);
        assert_eq!(v["name"], "demo/t1-cls/3");
        assert_eq!(v["created_at_ms"], 1_764_000_000_000i64);
        assert_eq!(v["resources"]["memory_bytes"], 24u64 << 30);
        assert_eq!(v["exit_code"], 0);
    }

    #[test]
    fn enums_are_lowercase_words_and_json_text_is_embedded() {
        let session = v1::Session {
            status: v1::SessionStatus::Failed as i32,
            kind: v1::SessionKind::TrialSubmit as i32,
            summary_json: r#"{"train/loss":0.25}"#.into(),
            ..Default::default()
        };
        let v = to_value(&session);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["kind"], "trial_submit");
        assert_eq!(v["summary"]["train/loss"], 0.25);
        assert!(v.get("summary_json").is_none());
        assert_eq!(to_value(&v1::Session::default())["summary"], Value::Null);
    }

    #[test]
    fn every_message_of_the_protos_is_found() {
        // A message missing from the descriptor would print as null.
        assert!(to_value(&v1::Empty {}).is_object());
        assert!(to_value(&v1::Decision::default()).is_object());
        assert!(to_value(&v1::QuotaUsage::default()).is_object());
    }
}
