//! The participant's loop and its failure cases, as one scenario run against any deployment.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::{Deployment, Output, User, eventually, repo_root};

const LONG: Duration = Duration::from_secs(120);

/// Copies the example baseline into a fresh directory (so uploads never include test artefacts).
pub fn baseline_copy(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let src = repo_root().join("examples/baseline");
    for f in ["main.py", ".nsmlignore"] {
        std::fs::copy(src.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
    }
    Ok(())
}

/// Logs a user in with their password.
pub fn login(dep: &Deployment, name: &str, password: &str) -> anyhow::Result<User> {
    let u = dep.user(name);
    let out = u.nsml_in(
        &repo_root(),
        &["login", "-u", name, "--password-stdin"],
        &format!("{password}\n"),
    )?;
    let out = out.ok()?;
    ensure!(
        out.stdout.contains("Welcome to NSML!"),
        "login printed {}",
        out.all()
    );
    Ok(u)
}

/// Finds one session in `ps -a -j`.
pub fn session(u: &User, name: &str) -> anyhow::Result<Value> {
    let ps = u.nsml(&["ps", "-a", "-j"])?.ok()?.json()?;
    ps.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        .with_context(|| format!("session {name} not in ps: {ps}"))
}

/// Waits for a session to reach an end state; returns it.
pub fn wait_ended(u: &User, name: &str) -> anyhow::Result<Value> {
    eventually(LONG, || {
        let s = session(u, name)?;
        let st = s["status"].as_str().unwrap_or_default().to_string();
        Ok(matches!(st.as_str(), "exited" | "failed" | "stopped").then_some(s))
    })
}

/// Starts a training session in `dir`; returns its name.
/// The resources a test session asks for on a CPU-only machine, as `nsml run` flags.
pub const SMALL_RUN: [&str; 8] = ["-g", "0", "-c", "1", "--memory", "2G", "--shm", "256M"];

pub fn run(u: &User, dir: &Path, dataset: &str, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(extra);
    run_with(u, dir, dataset, &args)
}

/// Starts a training session of `main.py` in `dir` with exactly `args` besides the dataset; returns its
/// name.
pub fn run_with(u: &User, dir: &Path, dataset: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut args = [&["run", "-d", dataset, "-e", "main.py"][..], args].concat();
    args.retain(|a| !a.is_empty());
    started(&u.nsml_in(dir, &args, "")?.ok()?)
}

/// The session `nsml run` says it started (`Session NAME is started`).
pub fn started(out: &Output) -> anyhow::Result<String> {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Session ")?.strip_suffix(" is started"))
        .map(str::to_string)
        .with_context(|| format!("no `Session … is started` line in {}", out.all()))
}

/// Parses `Score: X` from a submit's output.
pub fn score_of(out: &str) -> anyhow::Result<f64> {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Score:"))
        .with_context(|| format!("no score in {out}"))?;
    Ok(line.trim().trim_start_matches("Score:").trim().parse()?)
}

/// What the scenario leaves behind, checked again after a restart.
pub struct Left {
    pub alice_session: String,
    pub board: Value,
    pub overall: Value,
    pub checkpoints: Value,
}

/// The whole participant loop with two teams; returns what must survive a restart.
pub fn participant_loop(dep: &Deployment, work: &Path) -> anyhow::Result<Left> {
    let alice = login(dep, "alice", "alice-pass")?;
    let bob = login(dep, "bob", "bob-pass")?;
    let who = alice.nsml(&["whoami"])?.ok()?;
    ensure!(who.stdout.contains("alice"), "whoami: {}", who.all());

    let a_dir = work.join("alice");
    baseline_copy(&a_dir)?;
    // Alice trains briefly; her first checkpoint is a weak model.
    let s = run(
        &alice,
        &a_dir,
        "t1-cls",
        &["-a", "--epochs 3", "-m", "baseline"],
    )?;
    ensure!(s.starts_with("demo/t1-cls/"), "session name {s}");
    let first = session(&alice, &s)?;
    ensure!(
        matches!(
            first["status"].as_str(),
            Some("queued" | "running" | "exited")
        ),
        "fresh session status {first}"
    );
    let ended = wait_ended(&alice, &s)?;
    ensure!(ended["status"] == "exited", "session ended as {ended}");
    ensure!(!ended["summary"].is_null(), "no summary in {ended}");
    let table = alice.nsml(&["ps", "-a"])?.ok()?;
    ensure!(
        table.stdout.contains(&s) && table.stdout.contains("Exited"),
        "ps: {}",
        table.stdout
    );

    let logs = alice.nsml(&["logs", &s])?.ok()?;
    ensure!(logs.all().contains("epoch 3/3"), "logs: {}", logs.all());

    let ckpts = alice.nsml(&["model", "ls", &s, "-j"])?.ok()?.json()?;
    let names: Vec<&str> = ckpts
        .as_array()
        .context("model ls")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    ensure!(
        names.contains(&"0") && names.contains(&"2"),
        "checkpoints {ckpts}"
    );
    ensure!(
        ckpts.as_array().is_some_and(|a| a
            .iter()
            .all(|c| c["size_bytes"].as_u64().unwrap_or(0) > 0 && !c["summary"].is_null())),
        "checkpoint sizes and summaries {ckpts}"
    );

    // Trial submit: a score, and readable logs.
    let trial = alice.nsml(&["submit", "-t", &s, "0"])?.ok()?;
    let trial_score = score_of(&trial.stdout)?;
    // One narration, the session's own, in order, naming the trial set.
    let said = |line: &str| trial.stdout.lines().filter(|l| l.ends_with(line)).count();
    ensure!(
        said("Session ready") == 1
            && said("Load model") == 1
            && trial.stdout.contains("Infer trial set.")
            && !trial.stdout.contains("Infer test set."),
        "the trial submit's narration: {}",
        trial.stdout
    );
    let at = |needle: &str| trial.stdout.find(needle).unwrap_or(usize::MAX);
    ensure!(
        at("Session ready") < at("Load model")
            && at("Load model") < at("Infer trial set.")
            && at("Infer trial set.") < at("Score:"),
        "the trial submit's stages out of order: {}",
        trial.stdout
    );
    ensure!(
        (0.0..=1.0).contains(&trial_score),
        "trial score {trial_score}"
    );
    let ps = alice.nsml(&["ps", "-a", "-j"])?.ok()?.json()?;
    let trial_session = ps
        .as_array()
        .and_then(|a| a.iter().find(|x| x["kind"] == "trial"))
        .and_then(|x| x["name"].as_str())
        .context("no trial session in ps")?
        .to_string();
    let tl = alice.nsml(&["logs", &trial_session])?.ok()?;
    ensure!(tl.all().contains("Infer done"), "trial logs {}", tl.all());
    // The trial session holds quota until removed: a run that fits only without it is refused, naming it.
    let big = [
        "run",
        "-d",
        "t1-cls",
        "-g",
        "0",
        "-c",
        "1",
        "--memory",
        "169G",
        "--shm",
        "256M",
        "-a",
        "--epochs 1",
    ];
    let refused = alice.nsml_in(&a_dir, &big, "")?.failed()?;
    ensure!(
        refused.stderr.contains("memory") && refused.stderr.contains(&trial_session),
        "quota refusal while the trial session holds memory: {}",
        refused.all()
    );
    alice.nsml(&["rm", "-f", &trial_session])?.ok()?;
    let admitted = alice.nsml_in(&a_dir, &big, "")?.ok()?;
    let big_session = admitted
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Session ")
                .and_then(|l| l.strip_suffix(" is started"))
        })
        .with_context(|| format!("no session started: {}", admitted.all()))?
        .to_string();
    wait_ended(&alice, &big_session)?;

    // Real submit: a score; logs hidden from the participant.
    let real = alice.nsml(&["submit", &s, "0"])?.ok()?;
    let a_score = score_of(&real.stdout)?;
    let ps = alice.nsml(&["ps", "-a", "-j"])?.ok()?.json()?;
    let submit_session = ps
        .as_array()
        .and_then(|a| a.iter().find(|x| x["kind"] == "submit"))
        .and_then(|x| x["name"].as_str())
        .context("no submit session in ps")?
        .to_string();
    let hidden = alice.nsml(&["logs", &submit_session])?.failed()?;
    ensure!(
        hidden.stderr.contains("hidden"),
        "submit logs refusal: {}",
        hidden.all()
    );

    let board = alice
        .nsml(&["dataset", "board", "t1-cls", "-j"])?
        .ok()?
        .json()?;
    let rows = board["rows"].as_array().context("board rows")?;
    ensure!(
        rows.len() == 1 && rows[0]["team"] == "demo" && rows[0]["count"] == 1,
        "board {board}"
    );

    // A second real submit inside the interval is refused with the time to retry.
    let again = alice.nsml(&["submit", &s, "2"])?.failed()?;
    ensure!(
        again.stderr.contains("next submit is allowed at"),
        "interval refusal: {}",
        again.all()
    );

    // Bob trains longer and submits his last checkpoint.
    let b_dir = work.join("bob");
    baseline_copy(&b_dir)?;
    let bs = run(&bob, &b_dir, "t1-cls", &["-a", "--epochs 8"])?;
    ensure!(bs.starts_with("rivals/t1-cls/"), "bob's session {bs}");
    wait_ended(&bob, &bs)?;
    let b_real = bob.nsml(&["submit", &bs, "7"])?.ok()?;
    let b_score = score_of(&b_real.stdout)?;
    let board = alice
        .nsml(&["dataset", "board", "t1-cls", "-j"])?
        .ok()?
        .json()?;
    let rows = board["rows"].as_array().context("board rows")?.clone();
    ensure!(rows.len() == 2, "board {board}");
    let (best, other) = if b_score > a_score {
        ("rivals", "demo")
    } else {
        ("demo", "rivals")
    };
    ensure!(
        rows[0]["team"] == best && rows[1]["team"] == other,
        "board order for scores demo={a_score} rivals={b_score}: {board}"
    );
    let overall = alice.nsml(&["board", "demo", "-j"])?.ok()?.json()?;
    ensure!(
        overall["rows"].as_array().is_some_and(|r| r.len() == 2),
        "overall {overall}"
    );

    // Removing the session behind a board entry keeps the checkpoint that produced it (and its code).
    let removed = bob.nsml(&["rm", "-f", &bs])?.ok()?;
    ensure!(
        removed.stdout.contains(&format!("Kept checkpoint {bs}/7"))
            && removed.stdout.contains(&format!("Removed {bs}")),
        "rm of the session behind bob's board entry: {}",
        removed.all()
    );
    let pulled = work.join("pulled-board-entry");
    bob.nsml(&["model", "pull", &bs, "7", &pulled.display().to_string()])?
        .ok()?;
    ensure!(
        std::fs::read_dir(&pulled)?.next().is_some(),
        "the kept checkpoint can still be pulled"
    );

    // A session that is not there is an error, not an empty list of checkpoints.
    let missing = alice.nsml(&["model", "ls", "demo/t1-cls/999"])?.failed()?;
    ensure!(
        missing.stderr.contains("not found"),
        "model ls of a missing session: {}",
        missing.all()
    );

    // Another team's session is not yours.
    let theirs = bob.nsml(&["model", "ls", &s])?.failed()?;
    ensure!(
        theirs.stderr.contains("another team"),
        "other team's session: {}",
        theirs.all()
    );
    let theirs = bob.nsml(&["logs", &s])?.failed()?;
    ensure!(
        theirs.stderr.contains("another team"),
        "other team's logs: {}",
        theirs.all()
    );

    Ok(Left {
        alice_session: s,
        board,
        overall,
        checkpoints: ckpts,
    })
}

/// Bad input: each refused with a clear message, nothing stored lost.
pub fn bad_input(dep: &Deployment, work: &Path, left: &mut Left) -> anyhow::Result<()> {
    let alice = dep.user("alice");
    let anon = dep.user("nobody");
    let out = anon.nsml(&["ps"])?.failed()?;
    ensure!(
        out.stderr.contains("nsml login"),
        "not logged in: {}",
        out.all()
    );
    let out = anon
        .nsml_in(
            &repo_root(),
            &["login", "-u", "alice", "--password-stdin"],
            "wrong\n",
        )?
        .failed()?;
    ensure!(
        out.stderr.contains("wrong username or password"),
        "wrong password: {}",
        out.all()
    );

    let dir = work.join("bad");
    baseline_copy(&dir)?;
    let out = alice
        .nsml_in(&dir, &["run", "-d", "no-such-set", "-g", "0"], "")?
        .failed()?;
    ensure!(
        out.stderr.contains("dataset `no-such-set` not found"),
        "unknown dataset: {}",
        out.all()
    );
    // NSML's default of one GPU on a cluster without any: refused at once with the numbers, nothing held.
    let names = |u: &User| -> anyhow::Result<Vec<Value>> {
        let sessions = u.nsml(&["ps", "-a", "-j"])?.ok()?.json()?;
        Ok(sessions
            .as_array()
            .map(|all| all.iter().map(|s| s["name"].clone()).collect())
            .unwrap_or_default())
    };
    let listed = names(&alice)?;
    let out = alice
        .nsml_in(&dir, &["run", "-d", "t1-cls"], "")?
        .failed()?;
    ensure!(
        out.stderr.contains(
            "no machine of this cluster can ever hold the session: it asks for 1 GPU and the cluster has 0 GPUs"
        ) && out.stderr.contains("`-g 0`"),
        "a session that could never start: {}",
        out.all()
    );
    ensure!(
        !listed.is_empty() && names(&alice)? == listed,
        "a refused run leaves no session"
    );
    let out = alice.nsml(&["logs", "demo/t1-cls/999"])?.failed()?;
    ensure!(
        out.stderr.contains("not found"),
        "unknown session: {}",
        out.all()
    );
    // The checkpoint behind the team's board entry cannot be deleted by name.
    let out = alice
        .nsml(&["model", "rm", &left.alice_session, "0"])?
        .failed()?;
    ensure!(
        out.stderr
            .contains("it backs your team's best score on the `t1-cls` board"),
        "deleting a board entry's checkpoint: {}",
        out.all()
    );
    let out = alice
        .nsml(&["submit", "-t", &left.alice_session, "nope"])?
        .failed()?;
    ensure!(
        out.stderr.contains("checkpoint `nope` not found"),
        "unknown checkpoint: {}",
        out.all()
    );
    let out = alice
        .nsml_in(
            &dir,
            &["run", "-d", "t1-cls", "-g", "0", "-e", "missing.py"],
            "",
        )?
        .failed()?;
    ensure!(
        out.stderr.contains("missing.py"),
        "missing entry: {}",
        out.all()
    );

    // A crashing main.py: the session fails with its exit code.
    let crash = work.join("crash");
    std::fs::create_dir_all(&crash)?;
    std::fs::write(
        crash.join("main.py"),
        "import sys\nprint('about to fail')\nsys.exit(3)\n",
    )?;
    let cs = run(&alice, &crash, "t2-reg", &[])?;
    let ended = wait_ended(&alice, &cs)?;
    ensure!(
        ended["status"] == "failed" && ended["exit_code"] == 3,
        "crash: {ended}"
    );

    // A model that trains but crashes at submit time, and one that returns the wrong shape: both submits
    // fail with the reason, and neither starts the submit interval on t2-reg.
    let flaky = work.join("flaky");
    baseline_copy(&flaky)?;
    let main = std::fs::read_to_string(flaky.join("main.py"))?;
    let broken = format!(
        "import os as _os\nif _os.environ.get('NSML_MODE') == 'test' and _os.environ.get('NSML_SUBMIT_KIND') == 'submit':\n    raise SystemExit(5)\n{main}"
    );
    std::fs::write(flaky.join("main.py"), broken)?;
    let fs = run(&alice, &flaky, "t2-reg", &["-a", "--epochs 1"])?;
    wait_ended(&alice, &fs)?;
    let out = alice.nsml(&["submit", &fs, "0"])?.failed()?;
    ensure!(
        out.all().contains("failed"),
        "crashing submit: {}",
        out.all()
    );

    let shape = work.join("shape");
    baseline_copy(&shape)?;
    let main = std::fs::read_to_string(shape.join("main.py"))?;
    let wrong = main.replace(
        "nsml.bind(save=save, load=load, infer=infer)",
        "nsml.bind(save=save, load=load, infer=lambda p: [1, 2, 3])",
    );
    ensure!(wrong != main, "the baseline's bind line changed");
    std::fs::write(shape.join("main.py"), wrong)?;
    let ss = run(&alice, &shape, "t2-reg", &["-a", "--epochs 1"])?;
    wait_ended(&alice, &ss)?;
    let out = alice.nsml(&["submit", &ss, "0"])?.failed()?;
    ensure!(
        out.all().contains("predictions have 3 items"),
        "wrong shape: {}",
        out.all()
    );

    // The interval is untouched: a good submit on t2-reg is still admitted.
    let good = work.join("good");
    baseline_copy(&good)?;
    let gs = run(&alice, &good, "t2-reg", &["-a", "--epochs 2"])?;
    wait_ended(&alice, &gs)?;
    let out = alice.nsml(&["submit", &gs, "1"])?.ok()?;
    score_of(&out.stdout)?;

    // Nothing stored was lost along the way.
    let ckpts = alice
        .nsml(&["model", "ls", &left.alice_session, "-j"])?
        .ok()?
        .json()?;
    ensure!(ckpts == left.checkpoints, "checkpoints changed: {ckpts}");
    left.board = alice
        .nsml(&["dataset", "board", "t1-cls", "-j"])?
        .ok()?
        .json()?;
    left.overall = alice.nsml(&["board", "demo", "-j"])?.ok()?.json()?;
    Ok(())
}

/// After a restart: sessions, checkpoints and boards are all still there.
pub fn still_there(dep: &Deployment, left: &Left) -> anyhow::Result<()> {
    let alice = dep.user("alice");
    let s = eventually(LONG, || match session(&alice, &left.alice_session) {
        Ok(s) => Ok(Some(s)),
        Err(_) => Ok(None),
    })?;
    ensure!(
        s["status"] == "exited" && !s["summary"].is_null(),
        "session after restart {s}"
    );
    let ckpts = alice
        .nsml(&["model", "ls", &left.alice_session, "-j"])?
        .ok()?
        .json()?;
    ensure!(
        ckpts == left.checkpoints,
        "checkpoints after restart {ckpts}"
    );
    let board = alice
        .nsml(&["dataset", "board", "t1-cls", "-j"])?
        .ok()?
        .json()?;
    if board["rows"] != left.board["rows"] {
        bail!("board after restart {board}\nbefore {}", left.board);
    }
    let overall = alice.nsml(&["board", "demo", "-j"])?.ok()?.json()?;
    ensure!(
        overall["rows"] == left.overall["rows"],
        "overall after restart {overall}"
    );
    let logs = alice.nsml(&["logs", &left.alice_session])?.ok()?;
    ensure!(
        logs.all().contains("epoch 3/3"),
        "logs after restart: {}",
        logs.all()
    );
    Ok(())
}
