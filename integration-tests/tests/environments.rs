//! Python environments as a participant meets them, against a real deployment and the real package
//! index: a `requirements.txt` is installed into the session's environment (shown in its log), a
//! second session reuses it, a trial submit runs in its training session's environment, an install
//! that fails fails the session with pip's message, and `#nsml: NAME` selects one of the
//! competition's host environments (an unknown name is refused at `run`, listing those that exist).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;

use anyhow::{Context, ensure};
use nsml_integration_tests::scenario::{baseline_copy, login, run, wait_ended};
use nsml_integration_tests::{Deployment, User, repo_root};

/// Writes `files` into `dir`.
fn write(dir: &Path, files: &[(&str, &str)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

/// The session's whole log.
fn logs(u: &User, name: &str) -> anyhow::Result<String> {
    Ok(u.nsml(&["logs", name])?.ok()?.stdout)
}

const USES_SIX: &str =
    "import sys\nimport six\nimport nsml\nprint('six', six.__version__, 'in', sys.prefix)\n";

#[test]
fn requirements_install_once_reuse_and_follow_submits() -> anyhow::Result<()> {
    let dep = Deployment::embedded()?;
    let alice = login(&dep, "alice", "alice-pass")?;
    let work = tempfile::tempdir()?;

    let dir = work.path().join("six");
    write(
        &dir,
        &[
            ("main.py", USES_SIX),
            ("requirements.txt", "# what main.py imports\nsix==1.16.0\n"),
        ],
    )?;
    let first = run(&alice, &dir, "t1-cls", &[])?;
    let s = wait_ended(&alice, &first)?;
    let log = logs(&alice, &first)?;
    ensure!(s["status"] == "exited", "the first session: {s}\n{log}");
    for line in [
        "Installing requirements from requirements.txt",
        "Successfully installed six-1.16.0",
        "Installed requirements in ",
        "six 1.16.0 in ",
    ] {
        ensure!(log.contains(line), "`{line}` is not in the log:\n{log}");
    }

    // The same requirements again: nothing installed, the environment reused.
    let second = run(&alice, &dir, "t1-cls", &[])?;
    let s = wait_ended(&alice, &second)?;
    let log = logs(&alice, &second)?;
    ensure!(s["status"] == "exited", "the second session: {s}\n{log}");
    ensure!(
        log.contains("Reusing the environment built for requirements.txt")
            && !log.contains("Installing requirements")
            && log.contains("six 1.16.0 in "),
        "the second session reuses the environment:\n{log}"
    );

    // A trial submit runs in its training session's environment: the baseline with requirements.
    let base = work.path().join("baseline");
    baseline_copy(&base)?;
    write(&base, &[("requirements.txt", "six==1.16.0\n")])?;
    let trained = run(&alice, &base, "t1-cls", &[])?;
    let s = wait_ended(&alice, &trained)?;
    ensure!(s["status"] == "exited", "the baseline: {s}");
    let trial = alice.nsml(&["submit", "-t", &trained, "0"])?.ok()?;
    ensure!(
        trial
            .stdout
            .contains("Reusing the environment built for requirements.txt"),
        "the trial submit uses its training session's environment: {}",
        trial.all()
    );

    // A requirement no index has fails the session with pip's own words.
    let bad = work.path().join("bad");
    write(
        &bad,
        &[
            ("main.py", "print('never runs')\n"),
            ("requirements.txt", "nsml-no-such-package-e2f1==0.0.1\n"),
        ],
    )?;
    let failed = run(&alice, &bad, "t1-cls", &[])?;
    let s = wait_ended(&alice, &failed)?;
    let reason = s["reason"].as_str().unwrap_or_default();
    ensure!(
        s["status"] == "failed"
            && reason.starts_with("installing requirements failed: ERROR:")
            && reason.contains("nsml-no-such-package-e2f1"),
        "a failed install: {s}"
    );

    // A requirement line that is a pip option is refused before pip runs.
    let option = work.path().join("option");
    write(
        &option,
        &[
            ("main.py", "print('never runs')\n"),
            (
                "requirements.txt",
                "--index-url https://example.invalid/simple\nsix\n",
            ),
        ],
    )?;
    let refused = run(&alice, &option, "t1-cls", &[])?;
    let s = wait_ended(&alice, &refused)?;
    ensure!(
        s["status"] == "failed"
            && s["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("requirements.txt line 1"),
        "a pip option in requirements.txt: {s}"
    );
    Ok(())
}

/// The example competition with one more host environment, whose interpreter no machine has.
fn example_with_missing_interpreter(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(repo_root().join("examples/competition.toml"))?;
    let datasets = repo_root().join("examples/datasets");
    let text = text.replace(
        "path = \"datasets/",
        &format!("path = \"{}/", datasets.display()),
    ) + "\n[[environments]]\nname = \"gone\"\npython = \"/nonexistent/bin/python3\"\n";
    let path = dir.join("competition.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn nsml_line_selects_a_host_environment() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let manifest = example_with_missing_interpreter(work.path())?;
    let dep = Deployment::embedded_with(&[manifest])?;
    let alice = login(&dep, "alice", "alice-pass")?;

    // The example competition names `default`, the system's /usr/bin/python3.
    let dir = work.path().join("default");
    write(
        &dir,
        &[(
            "main.py",
            "#nsml: default\nimport sys\nimport nsml\nprint('running', sys.executable)\n",
        )],
    )?;
    let name = run(&alice, &dir, "t1-cls", &[])?;
    let s = wait_ended(&alice, &name)?;
    let log = logs(&alice, &name)?;
    ensure!(s["status"] == "exited", "{s}\n{log}");
    ensure!(
        log.contains("Using environment default (/usr/bin/python3)")
            && log.contains("running /usr/bin/python3"),
        "the session runs the host environment's interpreter:\n{log}"
    );

    // NSML's image names are not environments here: refused at run, with the names that exist.
    let unknown = work.path().join("unknown");
    write(
        &unknown,
        &[(
            "main.py",
            "#nsml: nsml/ml:cuda9.0-cudnn7-tf-1.11torch0.4\nprint(1)\n",
        )],
    )?;
    let out = alice
        .nsml_in(
            &unknown,
            &[
                "run", "-d", "t1-cls", "-e", "main.py", "-g", "0", "-c", "1", "--memory", "2G",
            ],
            "",
        )?
        .failed()?;
    ensure!(
        out.stderr
            .contains("environment `nsml/ml:cuda9.0-cudnn7-tf-1.11torch0.4`")
            && out.stderr.contains("`default`, `gone`"),
        "an unknown environment is refused listing the known ones: {}",
        out.all()
    );

    // A known environment whose interpreter this machine lacks fails the session, saying so.
    let gone = work.path().join("gone");
    write(&gone, &[("main.py", "#nsml: gone\nprint('never runs')\n")])?;
    let name = run(&alice, &gone, "t1-cls", &[])?;
    let s = wait_ended(&alice, &name)?;
    ensure!(
        s["status"] == "failed"
            && s["reason"].as_str().unwrap_or_default().contains(
                "environment `gone` names the interpreter /nonexistent/bin/python3, which this machine cannot run"
            ),
        "a missing interpreter: {s}"
    );
    Ok(())
}
