//! Participant code is hostile: each case is a `main.py` run as a training or submit session on the
//! embedded deployment, trying to read what is not its own (hidden labels, another team's files, the
//! platform's database and token), to reach out (the gateway, the outside, the runner) or to exhaust
//! the machine (processes, memory, CPU, disk, logs). Each must be contained, its session's outcome
//! must say what happened, and the platform must go on serving.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use nsml_integration_tests::hostile::{self, Ended, case, ended, run_case, still_serving};
use nsml_integration_tests::scenario::{login, session};
use nsml_integration_tests::{Deployment, User, eventually};

/// The attempts, as Python functions the cases call (after [`hostile::PRELUDE`]).
const ATTEMPTS: &str = r#"
def must_ok(reply):
    if not reply.get("ok"):
        raise PermissionError(reply.get("error"))
    return reply

def walk():
    found, n = [], 0
    for root, dirs, files in os.walk("/"):
        if root in ("/proc", "/sys", "/dev"):
            dirs[:] = []
            continue
        n += len(files)
        for f in files:
            p = os.path.join(root, f)
            if f in ("test_label", "nsml.db", "admin.token") or "/blobs/" in p:
                found.append(p)
    print("WALKED", n, "files", flush=True)
    if not found:
        raise FileNotFoundError("nothing of the platform anywhere")
    return found

def labels():
    data, runner = ARGS["data"], ARGS["runner"]
    attempt("blob directory", lambda: os.listdir(os.path.join(data, "blobs")))
    for b in ARGS["blobs"].split(","):
        attempt("blob by path", lambda: read(os.path.join(data, "blobs", b)))
        attempt("blob by ..", lambda: read("../" * 30 + data.lstrip("/") + "/blobs/" + b))
        attempt("blob by /proc/1/root", lambda: read("/proc/1/root" + data + "/blobs/" + b))
        attempt("blob by the runner's root",
                lambda: read("/proc/%s/root%s/blobs/%s" % (runner, data, b)))
    attempt("dataset cache", lambda: os.listdir(os.path.join(data, "runs", "datasets")))
    attempt("labels beside the data",
            lambda: only(os.listdir(os.environ["NSML_DATASET_PATH"]), ["train", "test"]))
    attempt("search the filesystem", walk)

def platform_files():
    data, runner = ARGS["data"], ARGS["runner"]
    for f in ["nsml.db", "admin.token"]:
        attempt(f + " by path", lambda: read(os.path.join(data, f)))
        attempt(f + " by ..", lambda: read("../" * 30 + data.lstrip("/") + "/" + f))
        attempt(f + " by /proc/1/root", lambda: read("/proc/1/root" + data + "/" + f))
        attempt(f + " by the runner's root", lambda: read("/proc/%s/root%s/%s" % (runner, data, f)))
    attempt("the runner's environment", lambda: read("/proc/%s/environ" % runner))
    attempt("the runner's command line", lambda: read("/proc/%s/cmdline" % runner))
    attempt("shadow passwords", lambda: read("/etc/shadow"))
    attempt("the data directory", lambda: only(os.listdir(data), ["runs"]))
    # `sdk` holds the Python SDK the runner writes out and mounts, read-only, into every sandbox.
    attempt("the SDK every session imports",
            lambda: open(os.path.join(os.environ["PYTHONPATH"], "nsml", "_api.py"), "a").write("changed"))
    attempt("the runner's directory",
            lambda: only(os.listdir(os.path.join(data, "runs")), ["sessions", "loads", "sockets", "sdk"]))
    print("ROOT", sorted(os.listdir("/")), flush=True)

def other_team():
    data, rival = ARGS["data"], ARGS["rival"]
    rdir = os.path.join(data, "runs", "sessions", rival)
    attempt("the rival team's directory",
            lambda: os.listdir(os.path.join(data, "runs", "sessions", "rivals")))
    attempt("the rival session's directory", lambda: os.listdir(rdir))
    attempt("the rival session's code", lambda: read(os.path.join(rdir, "code", "main.py")))
    attempt("the rival session's socket",
            lambda: socket.socket(socket.AF_UNIX).connect(os.path.join(rdir, "nsml.sock")) or "connected")
    attempt("every team's sessions",
            lambda: only(os.listdir(os.path.join(data, "runs", "sessions")), ["demo"]))

def sdk_forgery():
    rival, data = ARGS["rival"], ARGS["data"]
    attempt("load naming the rival session",
            lambda: must_ok(sdk({"op": "load", "checkpoint": "0", "session": rival})))
    attempt("load by a path", lambda: must_ok(sdk({"op": "load", "checkpoint": "../0", "session": None})))
    attempt("save the rival session's directory",
            lambda: must_ok(sdk({"op": "save", "checkpoint": "stolen",
                                 "path": "/proc/1/root" + data + "/runs/sessions/" + rival})))
    attempt("save the host's /etc", lambda: must_ok(sdk({"op": "save", "checkpoint": "etc", "path": "/etc"})))
    attempt("predictions from training", lambda: must_ok(sdk({"op": "predictions", "predictions": [1]})))
    r = sdk({"op": "report", "summary": True, "step": 1, "session": rival, "name": rival,
             "metrics": {"forged": 1}})
    print("REPORT", r, flush=True)

def connect(host, port):
    t = time.time()
    try:
        socket.create_connection((host, port), timeout=1).close()
    finally:
        print("TOOK", host, "%.3f" % (time.time() - t), flush=True)
    return "connected"

def network():
    port = int(ARGS["gateway"])
    attempt("the gateway on 127.0.0.1", lambda: connect("127.0.0.1", port))
    attempt("the gateway on localhost", lambda: connect("localhost", port))
    attempt("an outside address", lambda: connect("192.0.2.1", 80))
    attempt("a datagram out", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("192.0.2.1", 53)))
    attempt("network interfaces",
            lambda: only([l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]], ["lo"]))

def signals():
    runner = int(ARGS["runner"])
    attempt("kill the runner", lambda: os.kill(runner, signal.SIGKILL))
    attempt("stop the runner", lambda: os.kill(runner, signal.SIGSTOP))
    attempt("kill the sandbox's init", lambda: os.kill(1, signal.SIGKILL))
    others = sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid())
    print("VISIBLE", others, flush=True)
    for p in others:
        attempt("kill pid %d" % p, lambda: os.kill(p, signal.SIGKILL))
    attempt("kill every process", lambda: os.kill(-1, signal.SIGKILL))
    print("ALIVE", flush=True)
"#;

/// A `main.py` that runs `call` (Python).
fn script(call: &str) -> String {
    format!("{ATTEMPTS}\n{call}\nprint('CASE DONE', flush=True)\n")
}

/// The entry arguments every reading case gets: where the platform keeps things, and who to aim at.
fn targets(dep: &Deployment, rival: &str) -> anyhow::Result<String> {
    let mut blobs = Vec::new();
    for shard in std::fs::read_dir(dep.data_dir.join("blobs"))? {
        let shard = shard?;
        for b in std::fs::read_dir(shard.path())? {
            let b = b?;
            blobs.push(format!(
                "{}/{}",
                shard.file_name().to_string_lossy(),
                b.file_name().to_string_lossy()
            ));
        }
    }
    ensure!(!blobs.is_empty(), "no blobs to aim at");
    let gateway = dep.url.rsplit(':').next().context("gateway port")?;
    Ok(format!(
        "data={} runner={} blobs={} rival={rival} gateway={gateway}",
        dep.data_dir.canonicalize()?.display(),
        dep.pids()[0],
        blobs.join(",")
    ))
}

/// Checks that a case ran to its end, leaked nothing and was refused at least `denials` times.
fn contained(e: &Ended, denials: usize) -> anyhow::Result<()> {
    ensure!(e.leaks().is_empty(), "{} leaked: {:#?}", e.name, e.leaks());
    ensure!(
        e.logs.contains("CASE DONE"),
        "{} did not finish its attempts:\n{}",
        e.name,
        e.logs
    );
    ensure!(
        e.denied().len() >= denials,
        "{} was refused only {:?}",
        e.name,
        e.denied()
    );
    Ok(())
}

/// Text of the hidden test labels, which must never appear in a session's output.
fn hidden_label_rows() -> anyhow::Result<String> {
    let path = nsml_integration_tests::repo_root().join("examples/datasets/t1-cls/test/test_label");
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().skip(1).take(4).collect::<Vec<_>>().join("\n"))
}

/// Bob's session that holds a checkpoint and a live session directory while Alice's cases run.
fn rival_session(bob: &User, work: &Path) -> anyhow::Result<String> {
    let dir = case(
        work,
        "rival",
        "import nsml\n\
         nsml.bind(save=lambda d, **k: open(os.path.join(d, 'm.txt'), 'w').write('rival weights'))\n\
         nsml.save(0)\n\
         print('READY', flush=True)\n\
         time.sleep(300)\n",
    )?;
    let out = bob
        .nsml_in(
            &dir,
            &[
                "run", "-d", "t1-cls", "-e", "main.py", "-g", "0", "-c", "1", "--memory", "1G",
            ],
            "",
        )?
        .ok()?;
    let name = out
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Session ")
                .and_then(|l| l.strip_suffix(" is started"))
        })
        .context("bob's session did not start")?
        .to_string();
    eventually(Duration::from_secs(60), || {
        let logs = bob.nsml(&["logs", &name])?.all();
        Ok(logs.contains("READY").then_some(()))
    })?;
    Ok(name)
}

/// Runs `dir/main.py` (a training session that saves checkpoint 0, hostile in test mode) as a trial
/// submit of that checkpoint; returns the trial session once ended, and removes it (it holds quota).
fn trial_submit(u: &User, dir: &Path, args: &str) -> anyhow::Result<Ended> {
    let train = run_case(u, dir, "1", "1G", args)?;
    ensure!(
        train.outcome().0 == "exited",
        "training before the submit: {:?}\n{}",
        train.outcome(),
        train.logs
    );
    // The submit fails (the code sends no predictions); what matters is what its session did.
    let _ = u.nsml(&["submit", "-t", &train.name, "0"])?;
    let ps = u.nsml(&["ps", "-a", "-j"])?.ok()?.json()?;
    let trial = ps
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter(|s| s["kind"] == "trial" && s["source_session"] == train.name.as_str())
                .filter_map(|s| s["name"].as_str())
                .next_back()
        })
        .with_context(|| format!("no trial session of {} in {ps}", train.name))?
        .to_string();
    let e = ended(u, &trial)?;
    u.nsml(&["rm", "-f", &trial])?.ok()?;
    Ok(e)
}

/// The `main.py` of a submit case: saves checkpoint 0 when training; as the submit (which gets only
/// `--mode test --pause 1`), runs the attempts named in `submit=` of `args`, baked into the file.
fn submit_main(args: &str) -> String {
    script(&format!(
        "ARGS.update(dict(a.split('=', 1) for a in {args:?}.split()))\n{SUBMIT_MAIN}"
    ))
}

const SUBMIT_MAIN: &str = r#"
if TEST_MODE:
    for f in ARGS["submit"].split("+"):
        globals()[f]()
else:
    import nsml
    nsml.bind(save=lambda d, **k: open(os.path.join(d, "m.txt"), "w").write("m"))
    nsml.save(0)
"#;

#[test]
fn reading_what_is_not_yours_is_contained() -> anyhow::Result<()> {
    let dep = hostile::deployment()?;
    let tmp = tempfile::tempdir()?;
    let work = tmp.path();
    let alice = login(&dep, "alice", "alice-pass")?;
    let bob = login(&dep, "bob", "bob-pass")?;
    let rival = rival_session(&bob, work)?;
    let args = targets(&dep, &rival)?;
    let secret_rows = hidden_label_rows()?;
    let token = dep.admin_token()?;

    let check = |e: &Ended, denials: usize| -> anyhow::Result<()> {
        contained(e, denials)?;
        ensure!(
            !e.logs.contains(&secret_rows),
            "{} printed the hidden labels",
            e.name
        );
        ensure!(
            !e.logs.contains(&token),
            "{} printed the host token",
            e.name
        );
        ensure!(
            e.outcome().0 == "exited",
            "{}: {:?}\n{}",
            e.name,
            e.outcome(),
            e.logs
        );
        still_serving(&alice, &e.name)
    };

    // The hidden labels: by their blob's path, by `..`, through /proc, and by searching everything.
    let labels = run_case(
        &alice,
        &case(work, "labels", &script("labels()"))?,
        "1",
        "2G",
        &args,
    )?;
    check(&labels, 8)?;
    let walked: u64 = labels
        .logs
        .lines()
        .find_map(|l| l.strip_prefix("WALKED "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("the search did not run")?;
    ensure!(
        walked > 1000,
        "the search saw only {walked} files: it did not search"
    );

    // The platform's database and host token, the runner's environment.
    let files = run_case(
        &alice,
        &case(work, "platform", &script("platform_files()"))?,
        "1",
        "2G",
        &args,
    )?;
    check(&files, 13)?;

    // Another team's live session directory, code and socket.
    let other = run_case(
        &alice,
        &case(work, "other-team", &script("other_team()"))?,
        "1",
        "2G",
        &args,
    )?;
    check(&other, 5)?;

    // The SDK socket acts for its own session only, whatever a request names.
    let forged = run_case(
        &alice,
        &case(work, "forgery", &script("sdk_forgery()"))?,
        "1",
        "2G",
        &args,
    )?;
    check(&forged, 5)?;
    let rival_now = session(&bob, &rival)?;
    ensure!(
        !rival_now.to_string().contains("forged"),
        "a forged report reached the rival session: {rival_now}"
    );
    ensure!(
        forged.session["summary"]["forged"] == 1,
        "the report landed on the caller's own session: {}",
        forged.session
    );

    // A submit session (test inputs and the checkpoint only) searching for the labels it is scored on.
    let submit_args = format!("{args} submit=labels+platform_files");
    let submit_dir = case(work, "submit-labels", &submit_main(&submit_args))?;
    let trial = trial_submit(&alice, &submit_dir, &submit_args)?;
    contained(&trial, 20)?;
    ensure!(!trial.logs.contains(&secret_rows) && !trial.logs.contains(&token));

    bob.nsml(&["stop", &rival])?.ok()?;
    ensure!(ended(&bob, &rival)?.outcome().0 == "stopped");
    Ok(())
}

#[test]
fn reaching_out_is_contained() -> anyhow::Result<()> {
    let dep = hostile::deployment()?;
    let tmp = tempfile::tempdir()?;
    let work = tmp.path();
    let alice = login(&dep, "alice", "alice-pass")?;
    let runner = dep.pids()[0];
    let args = format!(
        "runner={runner} gateway={}",
        dep.url.rsplit(':').next().context("gateway port")?
    );

    // No network at all: the gateway on loopback is not there, the outside has no route.
    let net = run_case(
        &alice,
        &case(work, "network", &script("network()"))?,
        "1",
        "2G",
        &args,
    )?;
    contained(&net, 5)?;
    let took: f64 = net
        .logs
        .lines()
        .find_map(|l| l.strip_prefix("TOOK 192.0.2.1 "))
        .and_then(|t| t.trim().parse().ok())
        .context("no timing of the outside connection")?;
    ensure!(
        took < 0.5,
        "the outside connection failed only after {took} s (a route exists?)"
    );
    ensure!(net.outcome().0 == "exited", "{:?}", net.outcome());

    // The runner and the sandbox's init cannot be signalled; only the session's own processes exist.
    let sig = run_case(
        &alice,
        &case(work, "signals", &script("signals()"))?,
        "1",
        "2G",
        &args,
    )?;
    contained(&sig, 4)?;
    ensure!(sig.logs.contains("VISIBLE [1]"), "{}", sig.logs);
    ensure!(
        sig.logs.contains("ALIVE") && sig.outcome().0 == "exited",
        "{:?}\n{}",
        sig.outcome(),
        sig.logs
    );
    ensure!(
        Path::new(&format!("/proc/{runner}")).exists(),
        "the runner is gone"
    );
    still_serving(&alice, &sig.name)?;

    // The same from a submit session.
    let submit_args = format!("{args} submit=network+signals");
    let submit_dir = case(work, "submit-out", &submit_main(&submit_args))?;
    let trial = trial_submit(&alice, &submit_dir, &submit_args)?;
    contained(&trial, 9)?;
    still_serving(&alice, &trial.name).ok();
    ensure!(alice.nsml(&["ps"])?.code == 0);
    Ok(())
}

#[test]
fn exhausting_the_machine_is_contained() -> anyhow::Result<()> {
    let dep = hostile::deployment()?;
    let tmp = tempfile::tempdir()?;
    let work = tmp.path();
    let alice = login(&dep, "alice", "alice-pass")?;

    // `--memory 64M` with `--shm 64M` on top (128M in all, as the quota counts it), 256M allocated: the kernel
    // kills it, and the session says so as NSML did.
    let mem = run_case(
        &alice,
        &case(
            work,
            "memory",
            "b = bytearray(256 << 20)\nprint('ALLOCATED', flush=True)\n",
        )?,
        "1",
        "64M",
        "",
    )?;
    ensure!(
        mem.outcome()
            == (
                "failed".into(),
                137,
                "Killed (out of memory: limit 128M)".into()
            ),
        "{:?}\n{}",
        mem.outcome(),
        mem.logs
    );
    ensure!(!mem.logs.contains("ALLOCATED"));

    // `-c 1` with four busy threads (hashing releases the GIL): about one CPU, by the cgroup's count.
    let cpu = run_case(
        &alice,
        &case(
            work,
            "cpu",
            "import hashlib, threading\n\
             data = b'x' * (1 << 20)\n\
             def spin():\n    end = time.time() + 4\n    while time.time() < end:\n        hashlib.sha256(data).digest()\n\
             ts = [threading.Thread(target=spin) for _ in range(4)]\n\
             [t.start() for t in ts]\n[t.join() for t in ts]\n",
        )?,
        "1",
        "2G",
        "",
    )?;
    ensure!(cpu.outcome().0 == "exited", "{:?}", cpu.outcome());
    let usage = cpu
        .logs
        .lines()
        .find(|l| l.starts_with("Resources used:"))
        .with_context(|| format!("no usage line:\n{}", cpu.logs))?;
    let cpus: f64 = usage
        .split('(')
        .nth(1)
        .and_then(|r| r.split(" CPUs").next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unreadable usage line {usage}"))?;
    ensure!(
        // The ceiling is the point; a busy machine may give the threads much less than it.
        cpus > 0.0 && cpus <= 1.3,
        "four busy threads under -c 1 used {cpus} CPUs: {usage}"
    );

    // Filling the disk ends at the runner's disk limit (64M here), and the directory is removed.
    let disk = run_case(
        &alice,
        &case(
            work,
            "disk",
            "written = 0\n\
             with open(os.path.join(os.environ['NSML_SESSION_DIR'], 'fill'), 'wb') as fh:\n\
             \x20   while written < (4 << 30):\n\
             \x20       fh.write(b'x' * (1 << 20))\n\
             \x20       written += 1 << 20\n\
             \x20       if written % (16 << 20) == 0:\n\
             \x20           fh.flush(); os.fsync(fh.fileno())\n\
             print('FILLED', flush=True)\n",
        )?,
        "1",
        "2G",
        "",
    )?;
    ensure!(
        disk.outcome()
            == (
                "failed".into(),
                137,
                "Killed (disk limit: the session directory holds more than 64M)".into()
            ),
        "{:?}\n{}",
        disk.outcome(),
        disk.logs
    );
    ensure!(!disk.logs.contains("FILLED"));
    ensure!(
        !dep.data_dir.join("runs/sessions").join(&disk.name).exists(),
        "the filled directory is still there"
    );

    // A gigabyte of output: the first megabyte is kept, then one line says the rest was dropped.
    let flood = run_case(
        &alice,
        &case(
            work,
            "logs",
            "chunk = ('z' * 1023 + '\\n') * 1024\n\
             for i in range(1024):\n    sys.stdout.write(chunk)\n\
             sys.stdout.flush()\n\
             print('FLOODED', file=sys.stderr, flush=True)\n",
        )?,
        "1",
        "2G",
        "",
    )?;
    ensure!(
        flood.outcome() == ("exited".into(), 0, String::new()),
        "{:?}",
        flood.outcome()
    );
    ensure!(
        flood
            .logs
            .matches("log limit of 1M reached; further output is dropped")
            .count()
            == 1
    );
    ensure!(!flood.logs.contains("FLOODED"));
    ensure!(
        flood.logs.len() < (1 << 20) + (64 << 10),
        "{} bytes of logs kept",
        flood.logs.len()
    );

    // A fork bomb: held at the process limit while the platform answers; stop still ends it.
    let bomb_dir = case(
        work,
        "fork-bomb",
        "print('BOMB', flush=True)\n\
         while True:\n\
         \x20   try:\n\
         \x20       os.fork()\n\
         \x20   except OSError:\n\
         \x20       time.sleep(0.01)\n",
    )?;
    let out = alice
        .nsml_in(
            &bomb_dir,
            &[
                "run", "-d", "t1-cls", "-e", "main.py", "-g", "0", "-c", "1", "--memory", "2G",
            ],
            "",
        )?
        .ok()?;
    let bomb = out
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Session ")
                .and_then(|l| l.strip_suffix(" is started"))
        })
        .context("the bomb did not start")?
        .to_string();
    eventually(Duration::from_secs(60), || {
        Ok(alice
            .nsml(&["logs", &bomb])?
            .all()
            .contains("BOMB")
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    still_serving(&alice, &bomb)?;
    // Answered at all while the bomb is held in its cgroup; the bound leaves room for a busy machine.
    ensure!(
        t.elapsed() < Duration::from_secs(20),
        "ps took {:?} under the bomb",
        t.elapsed()
    );
    alice.nsml(&["stop", &bomb])?.ok()?;
    let bomb = ended(&alice, &bomb)?;
    ensure!(bomb.outcome().0 == "stopped", "{:?}", bomb.outcome());
    ensure!(
        bomb.logs.contains("process limit of 128 reached"),
        "{}",
        bomb.logs
    );
    Ok(())
}
