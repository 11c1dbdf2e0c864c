//! Host-provided evaluation scripts, for datasets whose metric is `custom`: the one part of scoring that runs
//! a program.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::ScoreError;
use super::metrics::{parse_finite, truncate};

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
    use crate::scoring::test_support::close;

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
        // Killed at its bound, not left to sleep its 30 s (with room for a busy machine).
        assert!(started.elapsed() < Duration::from_secs(25));

        let err = run_eval_script("/nonexistent/python3", &script, "{}", "id,l\n", timeout)
            .await
            .unwrap_err();
        assert!(matches!(err, ScoreError::EvalIo(_)), "{err}");
    }
}
