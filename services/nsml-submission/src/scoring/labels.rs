//! The hidden labels file: `KEY,LABEL` CSV with a header, read into [`Labels`].

use std::collections::{HashMap, HashSet};

use super::ScoreError;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::test_support::{labels, strings};

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
}
