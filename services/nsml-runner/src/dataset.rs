//! Which part of a dataset a session sees, and how its archive becomes `NSML_DATASET_PATH`.
//!
//! A training session gets the TRAIN part, a submit the TEST_DATA part, a trial submit the TRIAL_DATA
//! part; label parts are never fetched. The participant always sees NSML's layout:
//!
//! | session | `$NSML_DATASET_PATH/` holds |
//! | --- | --- |
//! | train | `train/train_data`, `train/train_label` (and whatever else the archive's `train/` holds) |
//! | submit, trial submit | `test/test_data` only |
//!
//! Archives normally arrive as `train/...`, `test/test_data/...` and `test_submit/test_data/...`.
//! [`normalize_part`] also accepts, in this order: the section directory at the top (`train/`; for a
//! trial `test_submit/` or `test/`), the section's content at the top (`train_data`, `train_label`;
//! `test_data`), or a single wrapping directory around either (e.g. `t1-cls/train/...`, at most two
//! levels). Anything else fails the session with the names found. For the test parts only
//! `test_data` is kept: anything beside it (a stray `test_label`) is dropped, never shown.

use std::fs;
use std::path::Path;

use nsml_proto::v1::{DatasetPart, SessionKind};

use crate::error::{Result, RunnerError};

/// The dataset part a session of `kind` runs on; `None` for a kind the runner does not know.
pub fn part_for(kind: SessionKind) -> Option<DatasetPart> {
    match kind {
        SessionKind::Train => Some(DatasetPart::Train),
        SessionKind::Submit => Some(DatasetPart::TestData),
        SessionKind::TrialSubmit => Some(DatasetPart::TrialData),
        SessionKind::Unspecified => None,
    }
}

/// A short, filesystem-friendly name of a part the runner fetches (`train`, `test_data`, `trial_data`).
pub fn part_slug(part: DatasetPart) -> &'static str {
    match part {
        DatasetPart::Train => "train",
        DatasetPart::TestData => "test_data",
        DatasetPart::TrialData => "trial_data",
        DatasetPart::TestLabel => "test_label",
        DatasetPart::TrialLabel => "trial_label",
        DatasetPart::EvalScript => "eval_script",
        DatasetPart::Unspecified => "unspecified",
    }
}

struct Shape {
    /// Section directory names the archive may carry at its top, preferred first.
    sections: &'static [&'static str],
    /// Names that show the archive's top is the section's content.
    content: &'static [&'static str],
    /// Where the section goes under the dataset root.
    section: &'static str,
    /// For test parts: the one entry of the section that is kept.
    keep_only: Option<&'static str>,
}

fn shape(part: DatasetPart) -> Option<Shape> {
    match part {
        DatasetPart::Train => Some(Shape {
            sections: &["train"],
            content: &["train_data", "train_label"],
            section: "train",
            keep_only: None,
        }),
        DatasetPart::TestData => Some(Shape {
            sections: &["test"],
            content: &["test_data"],
            section: "test",
            keep_only: Some("test_data"),
        }),
        DatasetPart::TrialData => Some(Shape {
            sections: &["test_submit", "test"],
            content: &["test_data"],
            section: "test",
            keep_only: Some("test_data"),
        }),
        _ => None,
    }
}

fn names(dir: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .map_err(|e| RunnerError::io(format!("cannot list {}", dir.display()), e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    Ok(out)
}

fn is_real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Moves the part extracted into `staging` into NSML's layout under `root` (created; it must not exist),
/// as the module documentation describes. `staging` is consumed.
pub fn normalize_part(dataset: &str, part: DatasetPart, staging: &Path, root: &Path) -> Result<()> {
    let layout_error = |detail: String| RunnerError::DatasetLayout {
        dataset: dataset.to_string(),
        part: part_slug(part),
        detail,
    };
    let Some(shape) = shape(part) else {
        return Err(layout_error("the runner never fetches this part".into()));
    };
    let mut dir = staging.to_path_buf();
    let mut section_dir = None;
    for _ in 0..3 {
        let found = names(&dir)?;
        if let Some(s) = shape.sections.iter().find(|s| is_real_dir(&dir.join(s))) {
            section_dir = Some(dir.join(s));
            break;
        }
        if shape.content.iter().any(|c| found.iter().any(|f| f == c)) {
            section_dir = Some(dir.clone());
            break;
        }
        match found.as_slice() {
            [only] if is_real_dir(&dir.join(only)) => dir.push(only),
            _ => {
                return Err(layout_error(format!(
                    "expected `{}/` or `{}` at its top, found [{}]",
                    shape.sections.join("/` or `"),
                    shape.content.join("`, `"),
                    found.join(", ")
                )));
            }
        }
    }
    let Some(section_dir) = section_dir else {
        return Err(layout_error("nested too deeply".into()));
    };
    let target = root.join(shape.section);
    fs::create_dir_all(root)
        .map_err(|e| RunnerError::io(format!("cannot create {}", root.display()), e))?;
    let moved = match shape.keep_only {
        None => fs::rename(&section_dir, &target),
        Some(keep) => {
            let from = section_dir.join(keep);
            if fs::symlink_metadata(&from).is_err() {
                return Err(layout_error(format!("no `{keep}` in the archive")));
            }
            fs::create_dir(&target).and_then(|()| fs::rename(&from, target.join(keep)))
        }
    };
    moved.map_err(|e| {
        RunnerError::io(
            format!("cannot move the dataset into {}", target.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "x").unwrap();
        }
    }

    fn normalized(part: DatasetPart, files: &[&str]) -> Result<Vec<String>> {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, root) = (tmp.path().join("staging"), tmp.path().join("root"));
        tree(&staging, files);
        normalize_part("ds", part, &staging, &root)?;
        let mut out = Vec::new();
        walk(&root, &root, &mut out);
        out.sort();
        Ok(out)
    }

    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }

    #[test]
    fn train_archives_land_under_train() {
        let want = ["train/train_data/data.csv", "train/train_label"];
        let files = ["train/train_data/data.csv", "train/train_label"];
        assert_eq!(normalized(DatasetPart::Train, &files).unwrap(), want);
        let bare = ["train_data/data.csv", "train_label"];
        assert_eq!(normalized(DatasetPart::Train, &bare).unwrap(), want);
        let wrapped = [
            "t1-cls/train/train_data/data.csv",
            "t1-cls/train/train_label",
        ];
        assert_eq!(normalized(DatasetPart::Train, &wrapped).unwrap(), want);
    }

    #[test]
    fn test_archives_keep_only_test_data() {
        let want = ["test/test_data/data.csv"];
        let files = ["test/test_data/data.csv", "test/test_label"];
        assert_eq!(normalized(DatasetPart::TestData, &files).unwrap(), want);
        assert_eq!(
            normalized(DatasetPart::TestData, &["test_data/data.csv"]).unwrap(),
            want
        );
    }

    #[test]
    fn trial_archives_move_to_test() {
        let want = ["test/test_data/data.csv"];
        let files = ["test_submit/test_data/data.csv"];
        assert_eq!(normalized(DatasetPart::TrialData, &files).unwrap(), want);
        let wrapped = ["t1-cls/test_submit/test_data/data.csv"];
        assert_eq!(normalized(DatasetPart::TrialData, &wrapped).unwrap(), want);
    }

    #[test]
    fn unknown_layouts_fail_with_what_was_found() {
        let err = normalized(DatasetPart::TestData, &["a.csv", "b.csv"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("found [a.csv, b.csv]"), "{err}");
        let err = normalized(DatasetPart::TestData, &["test/other"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `test_data`"), "{err}");
        assert!(normalized(DatasetPart::TestLabel, &["test/test_label"]).is_err());
    }

    #[test]
    fn kinds_never_map_to_label_parts() {
        for kind in [
            SessionKind::Train,
            SessionKind::Submit,
            SessionKind::TrialSubmit,
        ] {
            let part = part_for(kind).unwrap();
            assert!(!matches!(
                part,
                DatasetPart::TestLabel | DatasetPart::TrialLabel | DatasetPart::EvalScript
            ));
        }
        assert_eq!(part_for(SessionKind::Unspecified), None);
    }
}
