//! Loads, validates and packs manifests: the demo competition in `examples/` and small ones written per test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nsml_manifest::{ManifestError, PolicySpec, load};
use nsml_proto::v1 as pb;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/competition.toml")
}

/// Unpacks a gzip'd tar into a map from entry path to contents (directories end with `/` and hold nothing).
fn entries(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut out = BTreeMap::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut path = entry.path().unwrap().to_string_lossy().into_owned();
        if entry.header().entry_type().is_dir() && !path.ends_with('/') {
            path.push('/');
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.insert(path, data);
    }
    out
}

/// A temporary competition directory with one complete dataset `ds` and a manifest built from `toml`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data/ds");
        for (path, text) in [
            ("train/train_data/a.csv", "id,x\n1,0.5\n"),
            ("train/train_label", "id,label\n1,0\n"),
            ("test/test_data/a.csv", "id,x\n2,0.1\n"),
            ("test/test_label", "id,label\n2,1\n"),
            ("keys.txt", "# private part\n2\n\n3\n"),
            ("score.py", "print(1.0)\n"),
        ] {
            let file = root.join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(file, text).unwrap();
        }
        Self { dir }
    }

    fn manifest(&self, toml: &str) -> PathBuf {
        let path = self.dir.path().join("competition.toml");
        fs::write(&path, toml).unwrap();
        path
    }
}

const MINIMAL: &str = r#"
id = "c1"
title = "Test competition"
hosts = ["host"]

[[datasets]]
name = "ds"
path = "data/ds"
metric = "mse"
"#;

#[test]
fn the_demo_competition_loads() {
    let manifest = load(&example()).unwrap();
    assert_eq!(manifest.id(), "demo");
    assert_eq!(manifest.hosts(), ["host"]);
    assert_eq!(manifest.policy(), &PolicySpec::default());
    let names: Vec<_> = manifest
        .datasets()
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["t1-cls", "t2-reg"]);

    let request = manifest.competition_request();
    let competition = request.competition.unwrap();
    assert_eq!(competition.id, "demo");
    assert_eq!(competition.title, "NSML demo competition");
    assert_eq!(
        competition.datasets,
        [
            pb::DatasetRef {
                name: "t1-cls".into(),
                metric: "accuracy".into(),
                direction: pb::Direction::Descending as i32,
            },
            pb::DatasetRef {
                name: "t2-reg".into(),
                metric: "mse".into(),
                direction: pb::Direction::Ascending as i32,
            },
        ]
    );
    let policy = competition.policy.unwrap();
    assert_eq!(policy.team_memory_bytes, 170 * 1024 * 1024 * 1024);
    assert_eq!(policy.team_storage_bytes, 450 * 1024 * 1024 * 1024);
    assert_eq!(policy.submit_interval_secs, 3600);
    assert_eq!(policy.submit_time_limit_secs, 3600);
    assert_eq!(policy.submit_max_cpus, 4);
    let teams: Vec<_> = competition
        .teams
        .iter()
        .map(|t| (t.name.as_str(), t.members.clone()))
        .collect();
    assert_eq!(
        teams,
        [
            ("demo", vec!["alice".to_string()]),
            ("rivals", vec!["bob".to_string()])
        ]
    );
    let users: Vec<_> = request.users.iter().map(|u| u.username.as_str()).collect();
    assert_eq!(users, ["alice", "bob", "host"]);
    assert!(request.users.iter().all(|u| !u.password.is_empty()));

    let metas = manifest.dataset_metas();
    assert_eq!(metas.len(), 2);
    assert!(metas.iter().all(|m| m.competition == "demo"));
    assert_eq!(metas[0].private_fraction, 0.5);
    assert_eq!(metas[0].split_seed, 7);
    assert!(metas[0].private_keys.is_empty());
    assert_eq!(metas[0].eval_script, "");
}

#[test]
fn the_demo_datasets_pack_into_the_canonical_layout() {
    let manifest = load(&example()).unwrap();
    let archive = manifest.pack_dataset("t1-cls").unwrap();
    let files = entries(&archive);
    for expected in [
        "train/",
        "train/train_data/data.csv",
        "train/train_label",
        "test/test_data/data.csv",
        "test/test_label",
        "test_submit/test_data/data.csv",
        "test_submit/test_label",
    ] {
        assert!(
            files.contains_key(expected),
            "{expected} missing from {:?}",
            files.keys()
        );
    }
    let on_disk = fs::read(manifest.base_dir().join("datasets/t1-cls/test/test_label")).unwrap();
    assert_eq!(files["test/test_label"], on_disk);
    assert_eq!(
        manifest.pack_dataset("t1-cls").unwrap(),
        archive,
        "packing is reproducible"
    );
    assert!(matches!(
        manifest.pack_dataset("nope"),
        Err(ManifestError::UnknownDataset { .. })
    ));
}

#[test]
fn omitted_keys_take_their_defaults() {
    let fixture = Fixture::new();
    let manifest = load(&fixture.manifest(MINIMAL)).unwrap();
    assert_eq!(manifest.policy(), &PolicySpec::default());
    let dataset = &manifest.datasets()[0];
    assert_eq!(
        dataset.direction,
        pb::Direction::Ascending,
        "mse ranks smaller first"
    );
    assert_eq!(dataset.private_fraction, 0.5);
    assert_eq!(dataset.split_seed, 0);
    assert!(manifest.teams().is_empty());

    let files = entries(&manifest.pack_dataset("ds").unwrap());
    let names: Vec<_> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "test/test_data/",
            "test/test_data/a.csv",
            "test/test_label",
            "train/",
            "train/train_data/",
            "train/train_data/a.csv",
            "train/train_label",
        ],
        "no trial set, eval script or private keys"
    );
}

#[test]
fn policy_sizes_and_durations_are_parsed() {
    let fixture = Fixture::new();
    let toml = format!(
        "{MINIMAL}\n[policy]\nteam_memory = \"1.5G\"\nteam_storage = 1024\nsubmit_interval = \"30m\"\n\
         submit_time_limit = 90\nteam_gpus = 0\n"
    );
    let manifest = load(&fixture.manifest(&toml)).unwrap();
    let policy = manifest.policy();
    assert_eq!(policy.team_memory_bytes, 3 * 1024 * 1024 * 1024 / 2);
    assert_eq!(policy.team_storage_bytes, 1024);
    assert_eq!(policy.submit_interval, Duration::from_secs(1800));
    assert_eq!(policy.submit_time_limit, Duration::from_secs(90));
    assert_eq!(policy.team_gpus, 0, "CPU-only competitions are allowed");
    assert_eq!(policy.team_cpus, 16);
}

#[test]
fn eval_scripts_and_private_keys_are_packed() {
    let fixture = Fixture::new();
    let toml = MINIMAL.replace(
        "metric = \"mse\"",
        "metric = \"custom\"\neval_script = \"score.py\"\nprivate_keys_file = \"keys.txt\"\ndirection = \"Descending\"",
    );
    let manifest = load(&fixture.manifest(&toml)).unwrap();
    let meta = &manifest.dataset_metas()[0];
    assert_eq!(meta.eval_script, "score.py");
    assert_eq!(meta.private_keys, ["2", "3"]);
    assert_eq!(meta.direction, pb::Direction::Descending as i32);
    let files = entries(&manifest.pack_dataset("ds").unwrap());
    assert_eq!(files["eval/score.py"], b"print(1.0)\n");
    assert_eq!(files["private_keys.txt"], b"2\n3\n");
}

#[test]
fn trial_parts_are_packed_when_present_and_required_when_named() {
    let fixture = Fixture::new();
    let root = fixture.dir.path().join("data/ds");
    let manifest = load(&fixture.manifest(MINIMAL)).unwrap();
    fs::create_dir_all(root.join("test_submit")).unwrap();
    fs::write(root.join("test_submit/test_data"), "x").unwrap();
    let err = manifest.pack_dataset("ds").unwrap_err();
    assert!(err.to_string().contains("trial label"), "{err}");
    fs::write(root.join("test_submit/test_label"), "y").unwrap();
    let files = entries(&manifest.pack_dataset("ds").unwrap());
    assert_eq!(files["test_submit/test_data"], b"x");
    assert_eq!(files["test_submit/test_label"], b"y");

    let named = MINIMAL.replace(
        "metric = \"mse\"",
        "metric = \"mse\"\ntrial_data = \"elsewhere\"",
    );
    let manifest = load(&fixture.manifest(&named)).unwrap();
    let err = manifest.check_files().unwrap_err();
    assert!(
        matches!(
            err,
            ManifestError::MissingPart {
                what: "trial data",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn missing_parts_are_named() {
    let fixture = Fixture::new();
    fs::remove_file(fixture.dir.path().join("data/ds/test/test_label")).unwrap();
    let manifest = load(&fixture.manifest(MINIMAL)).unwrap();
    let err = manifest.pack_dataset("ds").unwrap_err().to_string();
    assert!(err.contains("dataset `ds`: test label"), "{err}");
    assert!(err.contains("test/test_label"), "{err}");
}

/// Loads `toml` and returns the error's message.
fn error_of(toml: &str) -> String {
    let fixture = Fixture::new();
    let path = fixture.manifest(toml);
    let err = load(&path).unwrap_err().to_string();
    assert!(
        err.contains("competition.toml"),
        "the error names the file: {err}"
    );
    err
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let err = error_of(&format!("{MINIMAL}\nsponsor = \"acme\"\n"));
    assert!(err.contains("unknown field `sponsor`"), "{err}");

    let err = error_of(&MINIMAL.replace("metric = \"mse\"", "metric = \"mse\"\nmetrik = \"mse\""));
    assert!(err.contains("unknown field `metrik`"), "{err}");

    let err = error_of(&format!("{MINIMAL}\n[policy]\nteam_gpu = 1\n"));
    assert!(err.contains("unknown field `team_gpu`"), "{err}");

    let err = error_of(&format!(
        "{MINIMAL}\n[[teams]]\nname = \"t\"\nmember = [\"a\"]\n"
    ));
    assert!(err.contains("unknown field `member`"), "{err}");

    let err = error_of(&format!(
        "{MINIMAL}\n[[users]]\nname = \"a\"\npasswd = \"x\"\n"
    ));
    assert!(err.contains("unknown field `passwd`"), "{err}");
}

#[test]
fn invalid_values_are_errors_naming_the_key() {
    let cases = [
        (
            MINIMAL.replace("\"mse\"", "\"auc\""),
            "`datasets[0].metric`: unknown metric `auc`",
        ),
        (
            MINIMAL.replace("\"mse\"", "\"custom\""),
            "`datasets[0].eval_script`",
        ),
        (
            MINIMAL.replace("name = \"ds\"", "name = \"DS\""),
            "`datasets[0].name`",
        ),
        (
            MINIMAL.replace("metric = \"mse\"", "metric = \"mse\"\ndirection = \"up\""),
            "`datasets[0].direction`",
        ),
        (
            MINIMAL.replace(
                "metric = \"mse\"",
                "metric = \"mse\"\nprivate_fraction = 1.5",
            ),
            "`datasets[0].private_fraction`",
        ),
        (
            MINIMAL.replace(
                "metric = \"mse\"",
                "metric = \"mse\"\nprivate_keys_file = \"none.txt\"",
            ),
            "`datasets[0].private_keys_file`: cannot read",
        ),
        (
            format!("{MINIMAL}\n[policy]\nteam_memory = \"lots\"\n"),
            "`policy.team_memory`: invalid size `lots`",
        ),
        (
            format!("{MINIMAL}\n[policy]\nsubmit_interval = \"soon\"\n"),
            "`policy.submit_interval`: invalid duration `soon`",
        ),
        (
            format!("{MINIMAL}\n[policy]\nteam_cpus = 0\n"),
            "`policy.team_cpus`: must be at least 1",
        ),
        (
            format!("{MINIMAL}\n[policy]\nteam_memory = \"0G\"\n"),
            "`policy.team_memory`",
        ),
        (
            format!("{MINIMAL}\n[policy]\nteam_sessions = 0\n"),
            "`policy.team_sessions`",
        ),
        (
            format!("{MINIMAL}\n[policy]\nsubmit_max_cpus = 0\n"),
            "`policy.submit_max_cpus`",
        ),
        (
            format!("{MINIMAL}\n[[datasets]]\nname = \"ds\"\npath = \"x\"\nmetric = \"mae\"\n"),
            "`datasets[1].name`: dataset `ds` is listed twice",
        ),
        (
            format!(
                "{MINIMAL}\n[[teams]]\nname = \"a\"\nmembers = [\"u\"]\n[[teams]]\nname = \"b\"\nmembers = [\"u\"]\n"
            ),
            "`teams[1].members[0]`: user `u` is in more than one team",
        ),
        (
            format!("{MINIMAL}\n[[teams]]\nname = \"a/b\"\n"),
            "`teams[0].name`",
        ),
        (
            format!("{MINIMAL}\n[[users]]\nname = \"u\"\n[[users]]\nname = \"u\"\n"),
            "`users[1].name`: user `u` is listed twice",
        ),
        (MINIMAL.replace("id = \"c1\"", "id = \"\""), "`id`"),
    ];
    for (toml, expected) in cases {
        let err = error_of(&toml);
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let err = load(Path::new("/nonexistent/competition.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot read `/nonexistent/competition.toml`"),
        "{err}"
    );
}

#[test]
fn metric_names_are_case_insensitive() {
    for (written, read) in [
        ("MSE", "mse"),
        ("Accuracy", "accuracy"),
        (" Macro_F1 ", "macro_f1"),
    ] {
        let fixture = Fixture::new();
        let path = fixture.manifest(&MINIMAL.replace("\"mse\"", &format!("\"{written}\"")));
        let manifest = load(&path).unwrap();
        assert_eq!(manifest.datasets()[0].metric, read, "{written}");
    }
    let fixture = Fixture::new();
    let path = fixture.manifest(&MINIMAL.replace("\"mse\"", "\"Accuracy\""));
    assert_eq!(
        load(&path).unwrap().datasets()[0].direction,
        pb::Direction::Descending,
        "the metric's own direction follows from its name in any case"
    );
}

#[test]
fn a_missing_or_misplaced_trial_set_is_a_warning_for_the_host() {
    let fixture = Fixture::new();
    let root = fixture.dir.path().join("data/ds");
    let manifest = load(&fixture.manifest(MINIMAL)).unwrap();
    let warnings = manifest.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("dataset `ds` has no trial set")
            && warnings[0].contains("test_submit/test_data")
            && warnings[0].contains("nsml submit -t"),
        "{}",
        warnings[0]
    );

    // Laid out differently: the folder is there, the parts are not where the platform looks.
    fs::create_dir_all(root.join("test_submit/data")).unwrap();
    let warnings = load(&fixture.manifest(MINIMAL)).unwrap().warnings();
    assert!(
        warnings[0].contains("holds `data`") && warnings[0].contains("trial_data and trial_label"),
        "{}",
        warnings[0]
    );

    fs::create_dir_all(root.join("test_submit/test_data")).unwrap();
    fs::write(root.join("test_submit/test_label"), "id,label\n9,1\n").unwrap();
    assert!(
        load(&fixture.manifest(MINIMAL))
            .unwrap()
            .warnings()
            .is_empty(),
        "a trial set where the platform looks for it"
    );
}

#[test]
fn a_schedule_is_read_as_times_and_checked() {
    let fixture = Fixture::new();
    let with = |lines: &str| format!("{MINIMAL}\n[policy]\n{lines}\n");
    let path = fixture.manifest(&with(
        "opens = \"2026-12-01T09:00:00Z\"\ncloses = \"2026-12-31T09:00:00Z\"",
    ));
    let policy = load(&path).unwrap().policy().to_proto();
    assert_eq!(policy.opens_at_ms, 1_796_115_600_000);
    assert_eq!(policy.closes_at_ms, 1_798_707_600_000);
    let err = error_of(&with("closes = \"next friday\""));
    assert!(
        err.contains("`policy.closes`") && err.contains("2026-12-01T09:00:00Z"),
        "{err}"
    );
    let err = error_of(&with(
        "opens = \"2026-12-31T09:00:00Z\"\ncloses = \"2026-12-01T09:00:00Z\"",
    ));
    assert!(err.contains("must be after policy.opens"), "{err}");
}

#[test]
fn host_environments_are_named_interpreters_carried_in_the_competition() {
    let fixture = Fixture::new();
    let path = fixture.manifest(&format!(
        "{MINIMAL}\n[[environments]]\nname = \"torch\"\npython = \"/opt/torch/bin/python3\"\ndescription = \"CUDA 12 torch\"\n\n[[environments]]\nname = \"default\"\npython = \"/usr/bin/python3\"\n"
    ));
    let manifest = load(&path).unwrap();
    let names: Vec<_> = manifest
        .environments()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["torch", "default"]);
    let competition = manifest.competition_request().competition.unwrap();
    assert_eq!(
        competition.environments[0],
        pb::Environment {
            name: "torch".into(),
            python: "/opt/torch/bin/python3".into(),
            description: "CUDA 12 torch".into(),
        }
    );

    let err = error_of(&format!(
        "{MINIMAL}\n[[environments]]\nname = \"torch\"\npython = \"bin/python3\"\n"
    ));
    assert!(
        err.contains("environments[0].python") && err.contains("not an absolute path"),
        "{err}"
    );
    let twice = "\n[[environments]]\nname = \"t\"\npython = \"/usr/bin/python3\"\n";
    let err = error_of(&format!("{MINIMAL}{twice}{twice}"));
    assert!(err.contains("environment `t` is listed twice"), "{err}");
    let err = error_of(&format!(
        "{MINIMAL}\n[[environments]]\nname = \"t\"\npython = \"/usr/bin/python3\"\nimage = \"x\"\n"
    ));
    assert!(err.contains("unknown field `image`"), "{err}");
}

/// The minimal manifest with a second dataset, a competition window, and `rounds` appended.
fn with_rounds(rounds: &str) -> String {
    format!(
        "{MINIMAL}\n[[datasets]]\nname = \"ds2\"\npath = \"data/ds\"\nmetric = \"mse\"\n\n[policy]\n\
         opens = \"2026-12-01T00:00:00Z\"\ncloses = \"2026-12-31T00:00:00Z\"\n{rounds}"
    )
}

const TWO_ROUNDS: &str = r#"
[[rounds]]
name = "preliminary"
datasets = ["ds"]
opens = "2026-12-01T00:00:00Z"
closes = "2026-12-10T00:00:00Z"
submit_interval = "10m"

[[rounds]]
name = "final"
datasets = ["ds2"]
opens = "2026-12-20T00:00:00Z"
closes = "2026-12-31T00:00:00Z"
submit_time_limit = "2h"
submit_max_cpus = 8
"#;

#[test]
fn rounds_carry_their_datasets_dates_and_submit_rules_inside_the_policy() {
    let fixture = Fixture::new();
    let path = fixture.manifest(&with_rounds(TWO_ROUNDS));
    let policy = load(&path).unwrap().policy().to_proto();
    let names: Vec<&str> = policy.rounds.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["preliminary", "final"]);
    let pre = &policy.rounds[0];
    assert_eq!(pre.datasets, ["ds"]);
    assert_eq!(
        (pre.opens_at_ms, pre.closes_at_ms),
        (1_796_083_200_000, 1_796_860_800_000)
    );
    // A rule the round sets replaces the competition's; one it leaves out stays the competition's.
    assert_eq!(pre.submit_interval_secs, Some(600));
    assert_eq!(
        (pre.submit_time_limit_secs, pre.submit_max_cpus),
        (None, None)
    );
    let fin = &policy.rounds[1];
    assert_eq!(
        (fin.submit_time_limit_secs, fin.submit_max_cpus),
        (Some(7200), Some(8))
    );
    assert_eq!(policy.rules_for("ds2").submit_interval_secs, 3600);
    // A manifest without rounds has none: the competition's schedule for every dataset.
    let plain = fixture.manifest(MINIMAL);
    assert!(load(&plain).unwrap().policy().to_proto().rounds.is_empty());
}

#[test]
fn a_round_that_does_not_fit_the_competition_is_an_error_saying_what_to_do() {
    let round = |name: &str, datasets: &str, opens: &str, closes: &str| {
        format!(
            "\n[[rounds]]\nname = \"{name}\"\ndatasets = [{datasets}]\nopens = \"{opens}\"\ncloses = \"{closes}\"\n"
        )
    };
    let ok = |name: &str, datasets: &str| {
        round(
            name,
            datasets,
            "2026-12-02T00:00:00Z",
            "2026-12-03T00:00:00Z",
        )
    };
    for (rounds, key, says) in [
        (
            ok("final", "\"nope\""),
            "`rounds[0].datasets[0]`",
            "names dataset `nope`, which the manifest does not list; the datasets are ds, ds2",
        ),
        (
            format!("{}{}", ok("a", "\"ds\""), ok("b", "\"ds2\", \"ds\"")),
            "`rounds[1].datasets[1]`",
            "dataset `ds` is in round `a` and in round `b`",
        ),
        (
            format!("{}{}", ok("a", "\"ds\""), ok("a", "\"ds2\"")),
            "`rounds[1].name`",
            "round `a` is listed twice",
        ),
        (ok("", "\"ds\""), "`rounds[0].name`", "must not be empty"),
        (ok("a", ""), "`rounds[0].datasets`", "names no dataset"),
        (
            round(
                "a",
                "\"ds\"",
                "2026-12-03T00:00:00Z",
                "2026-12-02T00:00:00Z",
            ),
            "`rounds[0].closes`",
            "must close after it opens",
        ),
        (
            round(
                "a",
                "\"ds\"",
                "2026-11-30T00:00:00Z",
                "2026-12-02T00:00:00Z",
            ),
            "`rounds[0].opens`",
            "opens before the competition does",
        ),
        (
            round(
                "a",
                "\"ds\"",
                "2026-12-02T00:00:00Z",
                "2027-01-02T00:00:00Z",
            ),
            "`rounds[0].closes`",
            "closes after the competition does",
        ),
        (
            "\n[[rounds]]\nname = \"a\"\ndatasets = [\"ds\"]\nopens = \"2026-12-02T00:00:00Z\"\n"
                .into(),
            "`rounds[0].closes`",
            "needs both `opens` and `closes`",
        ),
        (
            round("a", "\"ds\"", "soon", "2026-12-02T00:00:00Z"),
            "`rounds[0].opens`",
            "write it as 2026-12-01T09:00:00Z",
        ),
        (
            format!("{}submit_max_cpus = 0\n", ok("a", "\"ds\"")),
            "`rounds[0].submit_max_cpus`",
            "must be at least 1",
        ),
    ] {
        let err = error_of(&with_rounds(&rounds));
        assert!(err.contains(key) && err.contains(says), "{key}: {err}");
    }
}
