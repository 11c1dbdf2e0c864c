//! The auth read model: users, teams, memberships, competitions and live tokens, folded from the log.

use std::collections::{BTreeMap, HashMap};

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    Competition, CompetitionApplied, DatasetRegistered, EventPayload, Identity, MemberAdded,
    Membership, PasswordChanged, PrivateRevealed, TeamCreated, TokenIssued, TokenRevoked,
    UserRegistered,
};

#[derive(Debug, Clone)]
pub struct User {
    pub password_hash: String,
    pub admin: bool,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub username: String,
    pub expires_at_ms: i64,
}

#[derive(Debug, Default)]
pub struct AuthState {
    pub users: HashMap<String, User>,
    pub teams: BTreeMap<String, ()>,
    /// (team, competition) → members.
    pub members: BTreeMap<(String, String), Vec<String>>,
    pub competitions: BTreeMap<String, Competition>,
    pub tokens: HashMap<String, Token>,
    /// Dataset → the competition it was registered for (by the storage service).
    pub registered_datasets: HashMap<String, String>,
}

impl AuthState {
    /// The identity of a user: memberships and hosted competitions.
    pub fn identity(&self, username: &str) -> Option<Identity> {
        let user = self.users.get(username)?;
        let memberships = self
            .members
            .iter()
            .filter(|(_, m)| m.iter().any(|u| u == username))
            .map(|((team, competition), _)| Membership {
                team: team.clone(),
                competition: competition.clone(),
            })
            .collect();
        let hosts = self
            .competitions
            .values()
            .filter(|c| c.hosts.iter().any(|h| h == username))
            .map(|c| c.id.clone())
            .collect();
        Some(Identity {
            username: username.to_string(),
            admin: user.admin,
            memberships,
            hosts,
        })
    }

    /// The team `username` is in for `competition`.
    pub fn team_of(&self, username: &str, competition: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|((_, c), m)| c == competition && m.iter().any(|u| u == username))
            .map(|((t, _), _)| t.as_str())
    }

    /// Competitions a team entered.
    pub fn competitions_of_team(&self, team: &str) -> Vec<String> {
        self.competitions
            .values()
            .filter(|c| c.teams.iter().any(|t| t.name == team))
            .map(|c| c.id.clone())
            .collect()
    }

    /// The competition a dataset belongs to: the one it was registered for, else the one whose manifest lists
    /// it.
    pub fn owner_of_dataset(&self, dataset: &str) -> Option<&str> {
        self.registered_datasets
            .get(dataset)
            .map(String::as_str)
            .or_else(|| {
                self.competitions
                    .values()
                    .find(|c| c.datasets.iter().any(|d| d.name == dataset))
                    .map(|c| c.id.as_str())
            })
    }

    /// The competition with its current teams and members.
    pub fn competition_view(&self, id: &str) -> Option<Competition> {
        let mut c = self.competitions.get(id)?.clone();
        for t in &mut c.teams {
            t.members = self
                .members
                .get(&(t.name.clone(), id.to_string()))
                .cloned()
                .unwrap_or_default();
        }
        Some(c)
    }
}

impl ReadModel for AuthState {
    const TYPES: Option<&'static [&'static str]> = Some(&[
        UserRegistered::TYPE,
        PasswordChanged::TYPE,
        TeamCreated::TYPE,
        MemberAdded::TYPE,
        CompetitionApplied::TYPE,
        PrivateRevealed::TYPE,
        TokenIssued::TYPE,
        TokenRevoked::TYPE,
        DatasetRegistered::TYPE,
    ]);

    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<UserRegistered>(ev) {
            self.users.insert(
                e.username,
                User {
                    password_hash: e.password_hash,
                    admin: e.admin,
                },
            );
        } else if let Some(e) = decode::<PasswordChanged>(ev) {
            if let Some(u) = self.users.get_mut(&e.username) {
                u.password_hash = e.password_hash;
            }
        } else if let Some(e) = decode::<TeamCreated>(ev) {
            self.teams.insert(e.team, ());
        } else if let Some(e) = decode::<MemberAdded>(ev) {
            let m = self.members.entry((e.team, e.competition)).or_default();
            if !m.contains(&e.username) {
                m.push(e.username);
            }
        } else if let Some(e) = decode::<CompetitionApplied>(ev) {
            if let Some(c) = e.competition {
                for t in &c.teams {
                    self.members
                        .entry((t.name.clone(), c.id.clone()))
                        .or_default();
                }
                self.competitions.insert(c.id.clone(), c);
            }
        } else if let Some(e) = decode::<PrivateRevealed>(ev) {
            if let Some(c) = self.competitions.get_mut(&e.competition) {
                c.private_revealed = true;
            }
        } else if let Some(e) = decode::<TokenIssued>(ev) {
            self.tokens.insert(
                e.token_hash,
                Token {
                    username: e.username,
                    expires_at_ms: e.expires_at_ms,
                },
            );
        } else if let Some(e) = decode::<TokenRevoked>(ev) {
            self.tokens.remove(&e.token_hash);
        } else if let Some(e) = decode::<DatasetRegistered>(ev)
            && let Some(meta) = e.dataset.and_then(|d| d.meta)
        {
            self.registered_datasets.insert(meta.name, meta.competition);
        }
    }
}
