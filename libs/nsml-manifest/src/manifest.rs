//! A validated manifest and its conversion to API messages.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nsml_proto::v1 as pb;

use crate::ManifestError;
use crate::schema::{
    RawDataset, RawDuration, RawManifest, RawPolicy, RawRound, RawSize, RawTeam, RawUser,
};
use crate::units::{parse_duration, parse_size};

/// The metrics the platform's scorer knows; `custom` runs the dataset's own `eval_script`.
pub const METRICS: [&str; 8] = [
    "accuracy", "macro_f1", "mse", "rmse", "mae", "cer", "wer", "custom",
];

const GIB: u64 = 1024 * 1024 * 1024;

/// A competition manifest, parsed and validated, with paths resolved against the manifest's directory.
#[derive(Debug, Clone)]
pub struct Manifest {
    path: PathBuf,
    base_dir: PathBuf,
    id: String,
    title: String,
    hosts: Vec<String>,
    policy: PolicySpec,
    datasets: Vec<DatasetSpec>,
    teams: Vec<TeamSpec>,
    users: Vec<UserSpec>,
    environments: Vec<EnvironmentSpec>,
}

/// The per-team resource rules of a competition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub team_gpus: u32,
    pub team_cpus: u32,
    pub team_memory_bytes: u64,
    pub team_sessions: u32,
    pub team_storage_bytes: u64,
    /// Time between two successful real submits of a team on one dataset.
    pub submit_interval: Duration,
    /// Time a submit may run before it fails.
    pub submit_time_limit: Duration,
    pub submit_max_cpus: u32,
    /// When runs and submits open (milliseconds since the epoch); `None`: open from the start.
    pub opens_at_ms: Option<i64>,
    /// When submits close and the boards freeze; `None`: never.
    pub closes_at_ms: Option<i64>,
    /// The rounds (`[[rounds]]`), in the manifest's order.
    pub rounds: Vec<RoundSpec>,
}

/// A round of the competition (a preliminary, a final): its datasets follow its schedule and the submit rules
/// it sets instead of the competition's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundSpec {
    pub name: String,
    pub datasets: Vec<String>,
    /// When runs and submits on its datasets open (milliseconds since the epoch).
    pub opens_at_ms: i64,
    /// When submits on its datasets close and their boards freeze.
    pub closes_at_ms: i64,
    /// Its submit rules; `None`: the competition's.
    pub submit_interval: Option<Duration>,
    pub submit_time_limit: Option<Duration>,
    pub submit_max_cpus: Option<u32>,
}

impl RoundSpec {
    /// Converts the round to the API message.
    pub fn to_proto(&self) -> pb::Round {
        pb::Round {
            name: self.name.clone(),
            datasets: self.datasets.clone(),
            opens_at_ms: self.opens_at_ms,
            closes_at_ms: self.closes_at_ms,
            submit_interval_secs: self.submit_interval.map(|d| d.as_secs()),
            submit_time_limit_secs: self.submit_time_limit.map(|d| d.as_secs()),
            submit_max_cpus: self.submit_max_cpus,
        }
    }
}

impl Default for PolicySpec {
    /// Returns the rules of the 2022 competition: 2 GPUs, 16 CPUs, 170G of memory and two sessions per team,
    /// 450G of checkpoints, one real submit per hour that must finish within an hour, on at most 4 CPUs.
    fn default() -> Self {
        Self {
            team_gpus: 2,
            team_cpus: 16,
            team_memory_bytes: 170 * GIB,
            team_sessions: 2,
            team_storage_bytes: 450 * GIB,
            submit_interval: Duration::from_secs(3600),
            submit_time_limit: Duration::from_secs(3600),
            submit_max_cpus: 4,
            opens_at_ms: None,
            closes_at_ms: None,
            rounds: Vec::new(),
        }
    }
}

impl PolicySpec {
    /// Converts the rules to the API message.
    pub fn to_proto(&self) -> pb::Policy {
        pb::Policy {
            team_gpus: self.team_gpus,
            team_cpus: self.team_cpus,
            team_memory_bytes: self.team_memory_bytes,
            team_sessions: self.team_sessions,
            team_storage_bytes: self.team_storage_bytes,
            submit_interval_secs: self.submit_interval.as_secs(),
            submit_time_limit_secs: self.submit_time_limit.as_secs(),
            submit_max_cpus: self.submit_max_cpus,
            opens_at_ms: self.opens_at_ms.unwrap_or(0),
            closes_at_ms: self.closes_at_ms.unwrap_or(0),
            rounds: self.rounds.iter().map(RoundSpec::to_proto).collect(),
        }
    }
}

/// One dataset of the competition, with the paths of its parts resolved.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    pub name: String,
    pub description: String,
    /// The dataset's directory.
    pub root: PathBuf,
    pub metric: String,
    pub direction: pb::Direction,
    pub private_fraction: f64,
    pub split_seed: u64,
    /// Test keys of the private part, read from `private_keys_file`; empty when the fraction decides.
    pub private_keys: Vec<String>,
    pub private_keys_file: Option<PathBuf>,
    pub eval_script: Option<PathBuf>,
    pub tag: String,
    /// Directory of the training data (`train_data`, `train_label`).
    pub train: PathBuf,
    pub test_data: PathBuf,
    pub test_label: PathBuf,
    pub trial_data: PathBuf,
    pub trial_label: PathBuf,
    /// Whether the manifest named the trial parts, which makes them required.
    pub trial_required: bool,
}

impl DatasetSpec {
    /// Returns the file name the evaluation script has inside the archive's `eval/` directory.
    pub fn eval_script_name(&self) -> Option<String> {
        self.eval_script
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// Returns whether the dataset has a trial set (`test_submit/`) on disk.
    pub fn has_trial(&self) -> bool {
        self.trial_data.exists() || self.trial_label.exists()
    }

    /// What a host should know before applying this dataset, though it applies: a trial set that is missing
    /// (trial submits will be refused) or laid out other than where the platform looks for it.
    pub fn warnings(&self) -> Vec<String> {
        if self.trial_required || self.has_trial() {
            return Vec::new();
        }
        let trial_dir = self.trial_data.parent().unwrap_or(&self.root).to_path_buf();
        let found: Vec<String> = std::fs::read_dir(&trial_dir)
            .map(|entries| {
                let mut names: Vec<String> = entries
                    .flatten()
                    .map(|e| format!("`{}`", e.file_name().to_string_lossy()))
                    .collect();
                names.sort();
                names
            })
            .unwrap_or_default();
        let looked = format!(
            "{} and {}",
            self.trial_data.display(),
            self.trial_label.display()
        );
        vec![if found.is_empty() {
            format!(
                "dataset `{}` has no trial set (looked for {looked}): `nsml submit -t` will be refused on it; \
                 add a small trial set there, or name its parts with trial_data and trial_label",
                self.name
            )
        } else {
            format!(
                "dataset `{}`: {} holds {} but not the trial set's test_data and test_label, so it has no trial \
                 set and `nsml submit -t` will be refused on it; lay it out as {looked}, or name its parts with \
                 trial_data and trial_label",
                self.name,
                trial_dir.display(),
                found.join(", ")
            )
        }]
    }
}

/// A team and its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamSpec {
    pub name: String,
    pub members: Vec<String>,
}

/// A prepared Python environment of the machines that run sessions (`[[environments]]`), which a
/// session selects with `#nsml: NAME` as its entry's first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentSpec {
    pub name: String,
    /// The interpreter, an absolute path on those machines.
    pub python: String,
    pub description: String,
}

/// A user the manifest creates, with an optional initial password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub password: Option<String>,
}

/// Reads, parses and validates the manifest at `path`; errors name the file and the offending key.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let raw: RawManifest = toml::from_str(&text).map_err(|source| ManifestError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Validator { path }.manifest(raw, base_dir)
}

/// Turns the raw manifest into a [`Manifest`], collecting the first problem with the key it sits at.
struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn manifest(&self, raw: RawManifest, base_dir: PathBuf) -> Result<Manifest, ManifestError> {
        self.identifier("id", &raw.id)?;
        if raw.title.trim().is_empty() {
            return Err(self.invalid("title", "must not be empty"));
        }
        for (i, host) in raw.hosts.iter().enumerate() {
            self.identifier(&format!("hosts[{i}]"), host)?;
        }
        let mut policy = self.policy(raw.policy)?;
        let datasets = self.datasets(raw.datasets, &base_dir)?;
        policy.rounds = self.rounds(raw.rounds, &policy, &datasets)?;
        let teams = self.teams(raw.teams)?;
        let users = self.users(raw.users)?;
        let environments = self.environments(raw.environments)?;
        Ok(Manifest {
            path: self.path.to_path_buf(),
            base_dir,
            id: raw.id,
            title: raw.title,
            hosts: raw.hosts,
            policy,
            datasets,
            teams,
            users,
            environments,
        })
    }

    /// Validates the environments: names as identifiers, each once; interpreters as absolute paths.
    fn environments(
        &self,
        raw: Vec<crate::schema::RawEnvironment>,
    ) -> Result<Vec<EnvironmentSpec>, ManifestError> {
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, e) in raw.into_iter().enumerate() {
            self.identifier(&format!("environments[{i}].name"), &e.name)?;
            if !names.insert(e.name.clone()) {
                return Err(self.invalid(
                    format!("environments[{i}].name"),
                    format!("environment `{}` is listed twice", e.name),
                ));
            }
            if !Path::new(&e.python).is_absolute() {
                return Err(self.invalid(
                    format!("environments[{i}].python"),
                    format!(
                        "`{}` is not an absolute path: name the interpreter as the machines running sessions have it, such as /opt/torch/bin/python3",
                        e.python
                    ),
                ));
            }
            out.push(EnvironmentSpec {
                name: e.name,
                python: e.python,
                description: e.description,
            });
        }
        Ok(out)
    }

    /// Validates the datasets in order; no name may appear twice.
    fn datasets(
        &self,
        raw: Vec<RawDataset>,
        base_dir: &Path,
    ) -> Result<Vec<DatasetSpec>, ManifestError> {
        let mut datasets = Vec::with_capacity(raw.len());
        let mut names = HashSet::new();
        for (i, d) in raw.into_iter().enumerate() {
            let dataset = self.dataset(&format!("datasets[{i}]"), d, base_dir)?;
            if !names.insert(dataset.name.clone()) {
                return Err(self.invalid(
                    format!("datasets[{i}].name"),
                    format!("dataset `{}` is listed twice", dataset.name),
                ));
            }
            datasets.push(dataset);
        }
        Ok(datasets)
    }

    /// Validates the teams in order; no team may appear twice, and no user may be in two teams.
    fn teams(&self, raw: Vec<RawTeam>) -> Result<Vec<TeamSpec>, ManifestError> {
        let mut teams = Vec::with_capacity(raw.len());
        let mut team_names = HashSet::new();
        let mut members = HashSet::new();
        for (i, t) in raw.into_iter().enumerate() {
            self.identifier(&format!("teams[{i}].name"), &t.name)?;
            if !team_names.insert(t.name.clone()) {
                return Err(self.invalid(
                    format!("teams[{i}].name"),
                    format!("team `{}` is listed twice", t.name),
                ));
            }
            for (j, m) in t.members.iter().enumerate() {
                let key = format!("teams[{i}].members[{j}]");
                self.identifier(&key, m)?;
                if !members.insert(m.clone()) {
                    return Err(self.invalid(key, format!("user `{m}` is in more than one team")));
                }
            }
            teams.push(TeamSpec {
                name: t.name,
                members: t.members,
            });
        }
        Ok(teams)
    }

    /// Validates the users in order; no user may appear twice, and a password given must not be empty.
    fn users(&self, raw: Vec<RawUser>) -> Result<Vec<UserSpec>, ManifestError> {
        let mut users = Vec::with_capacity(raw.len());
        let mut user_names = HashSet::new();
        for (i, u) in raw.into_iter().enumerate() {
            self.identifier(&format!("users[{i}].name"), &u.name)?;
            if !user_names.insert(u.name.clone()) {
                return Err(self.invalid(
                    format!("users[{i}].name"),
                    format!("user `{}` is listed twice", u.name),
                ));
            }
            if u.password.as_deref() == Some("") {
                return Err(self.invalid(
                    format!("users[{i}].password"),
                    "must not be empty; leave the key out to create the user without a password",
                ));
            }
            users.push(UserSpec {
                name: u.name,
                password: u.password,
            });
        }
        Ok(users)
    }

    /// Accepts names of users, teams and competitions: they appear in session names (`TEAM/DATASET/N`) and
    /// event stream names, so no slashes, spaces or wildcards.
    fn identifier(&self, key: &str, value: &str) -> Result<(), ManifestError> {
        let mut chars = value.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if first_ok && rest_ok && value.len() <= 64 {
            Ok(())
        } else {
            Err(self.invalid(
                key,
                format!(
                    "`{value}` is not a valid name: use letters, digits, `_`, `-` and `.`, starting with a \
                     letter or digit, at most 64 characters"
                ),
            ))
        }
    }

    fn size(&self, key: &str, value: Option<RawSize>, default: u64) -> Result<u64, ManifestError> {
        match value {
            None => Ok(default),
            Some(RawSize::Bytes(b)) => Ok(b),
            Some(RawSize::Text(t)) => parse_size(&t).map_err(|e| self.invalid(key, e.to_string())),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<RawDuration>,
        default: Duration,
    ) -> Result<Duration, ManifestError> {
        match value {
            None => Ok(default),
            Some(RawDuration::Secs(s)) => Ok(Duration::from_secs(s)),
            Some(RawDuration::Text(t)) => {
                parse_duration(&t).map_err(|e| self.invalid(key, e.to_string()))
            }
        }
    }

    /// Reads an RFC 3339 time (`2026-12-01T09:00:00Z`) as milliseconds since the epoch.
    fn time(&self, key: &str, raw: Option<&str>) -> Result<Option<i64>, ManifestError> {
        let Some(raw) = raw else { return Ok(None) };
        let at = humantime::parse_rfc3339_weak(raw.trim()).map_err(|e| {
            self.invalid(
                key,
                format!("`{raw}` is not a time ({e}); write it as 2026-12-01T09:00:00Z (UTC)"),
            )
        })?;
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| self.invalid(key, format!("`{raw}` is before 1970")))?
            .as_millis();
        Ok(Some(i64::try_from(ms).unwrap_or(i64::MAX)))
    }

    /// Validates the rounds: each named once, over datasets the manifest lists and no other round has, with
    /// its dates in order and inside the competition's own window.
    fn rounds(
        &self,
        raw: Vec<RawRound>,
        policy: &PolicySpec,
        datasets: &[DatasetSpec],
    ) -> Result<Vec<RoundSpec>, ManifestError> {
        let mut names = HashSet::new();
        let mut taken: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let key = format!("rounds[{i}]");
            if r.name.trim().is_empty() {
                return Err(self.invalid(
                    format!("{key}.name"),
                    "must not be empty: name the round, such as `preliminary` or `final`",
                ));
            }
            self.identifier(&format!("{key}.name"), &r.name)?;
            if !names.insert(r.name.clone()) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!(
                        "round `{}` is listed twice; give each round its own name",
                        r.name
                    ),
                ));
            }
            if r.datasets.is_empty() {
                return Err(self.invalid(
                    format!("{key}.datasets"),
                    format!(
                        "round `{}` names no dataset; list the datasets it runs on",
                        r.name
                    ),
                ));
            }
            for (j, d) in r.datasets.iter().enumerate() {
                let dkey = format!("{key}.datasets[{j}]");
                if !datasets.iter().any(|x| &x.name == d) {
                    let known: Vec<&str> = datasets.iter().map(|x| x.name.as_str()).collect();
                    return Err(self.invalid(
                        dkey,
                        format!(
                            "round `{}` names dataset `{d}`, which the manifest does not list; the datasets \
                             are {}",
                            r.name,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                }
                if let Some(other) = taken.insert(d.clone(), r.name.clone()) {
                    return Err(self.invalid(
                        dkey,
                        format!(
                            "dataset `{d}` is in round `{other}` and in round `{}`; a dataset belongs to one \
                             round at most",
                            r.name
                        ),
                    ));
                }
            }
            let opens = self.time(&format!("{key}.opens"), r.opens.as_deref())?;
            let closes = self.time(&format!("{key}.closes"), r.closes.as_deref())?;
            let (Some(opens), Some(closes)) = (opens, closes) else {
                let missing = if opens.is_none() { "opens" } else { "closes" };
                return Err(self.invalid(
                    format!("{key}.{missing}"),
                    format!(
                        "round `{}` needs both `opens` and `closes` (RFC 3339, such as 2026-12-01T09:00:00Z)",
                        r.name
                    ),
                ));
            };
            if closes <= opens {
                return Err(self.invalid(
                    format!("{key}.closes"),
                    format!("round `{}` must close after it opens", r.name),
                ));
            }
            if let Some(c) = policy.opens_at_ms
                && opens < c
            {
                return Err(self.invalid(
                    format!("{key}.opens"),
                    format!(
                        "round `{}` opens before the competition does (policy.opens); move it to policy.opens \
                         or later",
                        r.name
                    ),
                ));
            }
            if let Some(c) = policy.closes_at_ms
                && closes > c
            {
                return Err(self.invalid(
                    format!("{key}.closes"),
                    format!(
                        "round `{}` closes after the competition does (policy.closes); move it to \
                         policy.closes or earlier, or move policy.closes",
                        r.name
                    ),
                ));
            }
            let submit_interval = match r.submit_interval {
                None => None,
                Some(v) => Some(self.duration(
                    &format!("{key}.submit_interval"),
                    Some(v),
                    Duration::ZERO,
                )?),
            };
            let submit_time_limit = match r.submit_time_limit {
                None => None,
                Some(v) => Some(self.duration(
                    &format!("{key}.submit_time_limit"),
                    Some(v),
                    Duration::ZERO,
                )?),
            };
            if submit_time_limit.is_some_and(|d| d.as_secs() == 0) {
                return Err(self.invalid(
                    format!("{key}.submit_time_limit"),
                    "must be at least one second",
                ));
            }
            if r.submit_max_cpus == Some(0) {
                return Err(self.invalid(format!("{key}.submit_max_cpus"), "must be at least 1"));
            }
            out.push(RoundSpec {
                name: r.name,
                datasets: r.datasets,
                opens_at_ms: opens,
                closes_at_ms: closes,
                submit_interval,
                submit_time_limit,
                submit_max_cpus: r.submit_max_cpus,
            });
        }
        Ok(out)
    }

    fn policy(&self, raw: RawPolicy) -> Result<PolicySpec, ManifestError> {
        let d = PolicySpec::default();
        let policy = PolicySpec {
            team_gpus: raw.team_gpus.unwrap_or(d.team_gpus),
            team_cpus: raw.team_cpus.unwrap_or(d.team_cpus),
            team_memory_bytes: self.size(
                "policy.team_memory",
                raw.team_memory,
                d.team_memory_bytes,
            )?,
            team_sessions: raw.team_sessions.unwrap_or(d.team_sessions),
            team_storage_bytes: self.size(
                "policy.team_storage",
                raw.team_storage,
                d.team_storage_bytes,
            )?,
            submit_interval: self.duration(
                "policy.submit_interval",
                raw.submit_interval,
                d.submit_interval,
            )?,
            submit_time_limit: self.duration(
                "policy.submit_time_limit",
                raw.submit_time_limit,
                d.submit_time_limit,
            )?,
            submit_max_cpus: raw.submit_max_cpus.unwrap_or(d.submit_max_cpus),
            opens_at_ms: self.time("policy.opens", raw.opens.as_deref())?,
            closes_at_ms: self.time("policy.closes", raw.closes.as_deref())?,
            rounds: Vec::new(),
        };
        if let (Some(opens), Some(closes)) = (policy.opens_at_ms, policy.closes_at_ms)
            && closes <= opens
        {
            return Err(self.invalid("policy.closes", "must be after policy.opens"));
        }
        if policy.team_cpus == 0 {
            return Err(self.invalid("policy.team_cpus", "must be at least 1"));
        }
        if policy.team_memory_bytes == 0 {
            return Err(self.invalid("policy.team_memory", "must not be zero"));
        }
        if policy.team_sessions == 0 {
            return Err(self.invalid("policy.team_sessions", "must be at least 1"));
        }
        if policy.submit_max_cpus == 0 {
            return Err(self.invalid("policy.submit_max_cpus", "must be at least 1"));
        }
        if policy.submit_time_limit.as_secs() == 0 {
            return Err(self.invalid("policy.submit_time_limit", "must be at least one second"));
        }
        Ok(policy)
    }

    fn dataset(
        &self,
        key: &str,
        mut raw: RawDataset,
        base_dir: &Path,
    ) -> Result<DatasetSpec, ManifestError> {
        self.dataset_name(key, &raw.name)?;
        // Metric names are case-insensitive, as the scorer reads them (`MSE`, `Accuracy`).
        raw.metric = raw.metric.trim().to_ascii_lowercase();
        self.metric(key, &raw)?;
        let direction = self.direction(key, &raw)?;
        let private_fraction = raw.private_fraction.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&private_fraction) {
            return Err(self.invalid(
                format!("{key}.private_fraction"),
                format!("{private_fraction} is not between 0 and 1"),
            ));
        }

        let root = base_dir.join(&raw.path);
        let part =
            |value: Option<String>, default: &str| root.join(value.as_deref().unwrap_or(default));
        let trial_required = raw.trial_data.is_some() || raw.trial_label.is_some();
        let private_keys_file = raw.private_keys_file.as_ref().map(|f| root.join(f));
        let private_keys = self.private_keys(key, private_keys_file.as_deref())?;
        let eval_script = raw.eval_script.as_ref().map(|s| root.join(s));
        if eval_script
            .as_ref()
            .is_some_and(|p| p.file_name().is_none())
        {
            return Err(self.invalid(format!("{key}.eval_script"), "must name a file"));
        }

        Ok(DatasetSpec {
            name: raw.name,
            description: raw.description,
            metric: raw.metric,
            direction,
            private_fraction,
            split_seed: raw.split_seed.unwrap_or(0),
            private_keys,
            private_keys_file,
            eval_script,
            tag: raw.tag,
            train: part(raw.train, "train"),
            test_data: part(raw.test_data, "test/test_data"),
            test_label: part(raw.test_label, "test/test_label"),
            trial_data: part(raw.trial_data, "test_submit/test_data"),
            trial_label: part(raw.trial_label, "test_submit/test_label"),
            trial_required,
            root,
        })
    }

    /// Accepts a dataset name that can appear in session names and storage paths.
    fn dataset_name(&self, key: &str, name: &str) -> Result<(), ManifestError> {
        if valid_dataset_name(name) {
            return Ok(());
        }
        Err(self.invalid(
            format!("{key}.name"),
            format!(
                "`{name}` is not a valid dataset name: use lowercase letters, digits, `_` and `-`, starting \
                 with a letter or digit, at most 63 characters"
            ),
        ))
    }

    /// Accepts a metric the scorer knows; `custom` needs an evaluation script.
    fn metric(&self, key: &str, raw: &RawDataset) -> Result<(), ManifestError> {
        if !METRICS.contains(&raw.metric.as_str()) {
            return Err(self.invalid(
                format!("{key}.metric"),
                format!(
                    "unknown metric `{}`; expected one of {}",
                    raw.metric,
                    METRICS.join(", ")
                ),
            ));
        }
        if raw.metric == "custom" && raw.eval_script.is_none() {
            return Err(self.invalid(
                format!("{key}.eval_script"),
                "metric `custom` needs an eval_script that prints the score",
            ));
        }
        Ok(())
    }

    /// Reads the ranking direction, or the metric's own when the manifest does not say.
    fn direction(&self, key: &str, raw: &RawDataset) -> Result<pb::Direction, ManifestError> {
        match raw
            .direction
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => Ok(default_direction(&raw.metric)),
            Some("descending") => Ok(pb::Direction::Descending),
            Some("ascending") => Ok(pb::Direction::Ascending),
            Some(other) => Err(self.invalid(
                format!("{key}.direction"),
                format!("unknown direction `{other}`; expected `ascending` or `descending`"),
            )),
        }
    }

    /// Reads the private part's test keys, one a line, skipping blank lines and `#` comments.
    fn private_keys(&self, key: &str, file: Option<&Path>) -> Result<Vec<String>, ManifestError> {
        let Some(file) = file else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(file).map_err(|e| {
            self.invalid(
                format!("{key}.private_keys_file"),
                format!("cannot read `{}`: {e}", file.display()),
            )
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }
}

/// Returns whether `name` matches `[a-z0-9][a-z0-9_-]{0,62}`.
fn valid_dataset_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 63
}

/// Returns the direction a metric is ranked in when the manifest does not say: scores that measure success rank
/// larger first, errors and losses smaller first.
fn default_direction(metric: &str) -> pb::Direction {
    match metric {
        "accuracy" | "macro_f1" => pb::Direction::Descending,
        _ => pb::Direction::Ascending,
    }
}

impl Manifest {
    /// Returns the path the manifest was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the directory relative paths in the manifest are resolved against.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Returns the competition id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns the competition title.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// Returns the users who host the competition.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// Returns the per-team resource rules.
    pub fn policy(&self) -> &PolicySpec {
        &self.policy
    }

    /// Returns the datasets, in manifest order.
    pub fn datasets(&self) -> &[DatasetSpec] {
        &self.datasets
    }

    /// What the host should know before applying: each dataset's [`DatasetSpec::warnings`].
    pub fn warnings(&self) -> Vec<String> {
        self.datasets
            .iter()
            .flat_map(DatasetSpec::warnings)
            .collect()
    }

    /// Returns the dataset called `name`.
    pub fn dataset(&self, name: &str) -> Result<&DatasetSpec, ManifestError> {
        self.datasets
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| ManifestError::UnknownDataset {
                name: name.to_string(),
            })
    }

    /// Returns the teams, in manifest order.
    pub fn teams(&self) -> &[TeamSpec] {
        &self.teams
    }

    /// Returns the prepared Python environments, in manifest order.
    pub fn environments(&self) -> &[EnvironmentSpec] {
        &self.environments
    }

    /// Returns the users the manifest creates, in manifest order.
    pub fn users(&self) -> &[UserSpec] {
        &self.users
    }

    /// Builds the `ApplyCompetition` request: the competition with its datasets, policy, teams and hosts, and the
    /// users to create.
    pub fn competition_request(&self) -> pb::ApplyCompetitionRequest {
        pb::ApplyCompetitionRequest {
            competition: Some(pb::Competition {
                id: self.id.clone(),
                title: self.title.clone(),
                datasets: self
                    .datasets
                    .iter()
                    .map(|d| pb::DatasetRef {
                        name: d.name.clone(),
                        metric: d.metric.clone(),
                        direction: d.direction as i32,
                    })
                    .collect(),
                policy: Some(self.policy.to_proto()),
                teams: self
                    .teams
                    .iter()
                    .map(|t| pb::Team {
                        name: t.name.clone(),
                        members: t.members.clone(),
                    })
                    .collect(),
                hosts: self.hosts.clone(),
                private_revealed: false,
                policy_version: 0,
                environments: self
                    .environments
                    .iter()
                    .map(|e| pb::Environment {
                        name: e.name.clone(),
                        python: e.python.clone(),
                        description: e.description.clone(),
                    })
                    .collect(),
            }),
            users: self
                .users
                .iter()
                .map(|u| pb::UserSpec {
                    username: u.name.clone(),
                    password: u.password.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }

    /// Builds the `meta` message of every dataset's registration, in manifest order.
    pub fn dataset_metas(&self) -> Vec<pb::DatasetMeta> {
        self.datasets
            .iter()
            .map(|d| pb::DatasetMeta {
                name: d.name.clone(),
                competition: self.id.clone(),
                description: d.description.clone(),
                metric: d.metric.clone(),
                direction: d.direction as i32,
                private_fraction: d.private_fraction,
                split_seed: d.split_seed,
                private_keys: d.private_keys.clone(),
                eval_script: d.eval_script_name().unwrap_or_default(),
                tag: d.tag.clone(),
            })
            .collect()
    }

    /// Checks that every dataset's required parts exist, so that applying fails before anything is uploaded.
    pub fn check_files(&self) -> Result<(), ManifestError> {
        for d in &self.datasets {
            let missing = |what: &'static str, path: &Path| ManifestError::MissingPart {
                dataset: d.name.clone(),
                what,
                path: path.to_path_buf(),
            };
            if !d.root.is_dir() {
                return Err(missing("directory", &d.root));
            }
            if !d.train.is_dir() {
                return Err(missing("training directory", &d.train));
            }
            if !d.test_data.exists() {
                return Err(missing("test data", &d.test_data));
            }
            if !d.test_label.exists() {
                return Err(missing("test label", &d.test_label));
            }
            if d.trial_required || d.has_trial() {
                if !d.trial_data.exists() {
                    return Err(missing("trial data", &d.trial_data));
                }
                if !d.trial_label.exists() {
                    return Err(missing("trial label", &d.trial_label));
                }
            }
            if let Some(script) = &d.eval_script
                && !script.is_file()
            {
                return Err(missing("eval script", script));
            }
        }
        Ok(())
    }
}
