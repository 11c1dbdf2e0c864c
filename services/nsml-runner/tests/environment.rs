//! Environments from `requirements.txt` with the real `venv` and pip, from the package index pip is
//! configured with: built once, reused, built once for sessions asking at the same time, a failed
//! install's reason, and least-recently-used eviction that spares environments in use.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Path, PathBuf};

use nsml_runner::environment::{EnvRequest, EnvironmentCache, PreparedEnv, python_version};
use nsml_runner::logs::LogSender;

/// The interpreter environments are made on: the `python3` on `PATH`, resolved.
async fn base() -> (PathBuf, String) {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 must be installed");
    let base = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let version = python_version(&base).await.unwrap();
    (base, version)
}

async fn request(requirements: &str) -> EnvRequest {
    let (base, base_version) = base().await;
    EnvRequest {
        base,
        base_version,
        system_site_packages: false,
        requirements: requirements.to_string(),
    }
}

/// Prepares `req` in `cache`, returning the environment (or the error) and the log lines.
async fn prepare(
    cache: &EnvironmentCache,
    req: &EnvRequest,
) -> (Result<PreparedEnv, String>, Vec<String>) {
    let (logs, mut rx) = LogSender::channel();
    let collect = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(l) = rx.recv().await {
            lines.push(l.text);
        }
        lines
    });
    let env = cache.prepare(req, &logs).await.map_err(|e| e.to_string());
    drop(logs);
    (env, collect.await.unwrap())
}

fn imports(python: &Path, module: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", &format!("import {module}")])
        .status()
        .unwrap()
        .success()
}

fn bytes_of(env: &PreparedEnv) -> u64 {
    let note = std::fs::read_to_string(env.root.join(".nsml-env")).unwrap();
    note.lines()
        .find_map(|l| l.strip_prefix("bytes: ")?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn requirements_install_once_and_the_cache_serves_the_next_session() {
    let dir = tempfile::tempdir().unwrap();
    let cache = EnvironmentCache::new(dir.path().join("envs"), 10 << 30);
    let req = request("six==1.16.0\n").await;

    let (env, log) = prepare(&cache, &req).await;
    let env = env.unwrap();
    assert!(!env.reused);
    assert!(
        log.iter()
            .any(|l| l.starts_with("Installing requirements from requirements.txt")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("Successfully installed six-1.16.0")),
        "pip's own output is in the log: {log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("Installed requirements in ")),
        "{log:?}"
    );
    assert!(imports(&env.python, "six"));
    drop(env);

    let (again, log) = prepare(&cache, &req).await;
    let again = again.unwrap();
    assert!(again.reused);
    assert!(
        !log.iter().any(|l| l.starts_with("Installing")),
        "nothing is installed twice: {log:?}"
    );
    assert!(log.iter().any(|l| l.starts_with("Reusing the environment")));
    assert!(imports(&again.python, "six"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_asking_at_the_same_time_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = EnvironmentCache::new(dir.path().join("envs"), 10 << 30);
    let req = request("six==1.16.0\n").await;
    // Two caches over one directory stand for two runner processes of one machine.
    let other = EnvironmentCache::new(dir.path().join("envs"), 10 << 30);
    let ((a, log_a), (b, log_b), (c, log_c)) = tokio::join!(
        prepare(&cache, &req),
        prepare(&cache, &req),
        prepare(&other, &req)
    );
    let built = [a.unwrap(), b.unwrap(), c.unwrap()]
        .iter()
        .filter(|e| !e.reused)
        .count();
    assert_eq!(built, 1, "one build for three sessions");
    let installs = [log_a, log_b, log_c]
        .iter()
        .flatten()
        .filter(|l| l.starts_with("Installing requirements"))
        .count();
    assert_eq!(installs, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_install_fails_with_pips_message_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = EnvironmentCache::new(dir.path().join("envs"), 10 << 30);
    let req = request("nsml-no-such-package-e2f1==0.0.1\n").await;
    let (env, log) = prepare(&cache, &req).await;
    let err = env.unwrap_err();
    assert!(
        err.starts_with("installing requirements failed: ERROR:")
            && err.contains("nsml-no-such-package-e2f1"),
        "{err}"
    );
    assert!(log.iter().any(|l| l.contains("ERROR:")), "{log:?}");
    assert!(!dir.path().join("envs").join(req.key()).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_least_recently_used_environment_goes_but_not_one_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let envs = dir.path().join("envs");
    let roomy = EnvironmentCache::new(envs.clone(), 10 << 30);
    let (a, _) = prepare(&roomy, &request("six==1.16.0\n").await).await;
    let a = a.unwrap();
    let one = bytes_of(&a);
    let a_root = a.root.clone();
    drop(a);

    // Room for one environment and a half.
    let tight = EnvironmentCache::new(envs.clone(), one + one / 2);
    let (b, _) = prepare(&tight, &request("six==1.15.0\n").await).await;
    let b = b.unwrap();
    assert!(
        !a_root.exists(),
        "the older environment, unused, is evicted"
    );
    let (c, _) = prepare(&tight, &request("six==1.14.0\n").await).await;
    let c = c.unwrap();
    assert!(b.root.exists(), "an environment in use is never evicted");
    assert!(imports(&b.python, "six") && imports(&c.python, "six"));
}

#[test]
fn what_an_interrupted_build_left_goes_unless_a_build_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let envs = dir.path().join("envs");
    let cache = EnvironmentCache::new(envs.clone(), 10 << 30);
    for name in ["left", "building", "done"] {
        std::fs::create_dir_all(envs.join(name).join("bin")).unwrap();
    }
    std::fs::write(envs.join("done").join(".nsml-env"), "bytes: 1\n").unwrap();
    // Another runner is building `building` right now.
    let held = std::fs::File::create(envs.join("building.build")).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();

    assert_eq!(cache.remove_incomplete(), 1);
    assert!(!envs.join("left").exists());
    assert!(envs.join("building").exists() && envs.join("done").exists());
}
