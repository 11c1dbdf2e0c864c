//! Command handling: load what a decision needs from the read model, decide, append the events, then wait
//! until the read model shows them (so a call right after sees the change).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::bounds::shown;
use nsml_common::caller::Caller;
use nsml_common::event::new_event;
use nsml_common::names::check_ident;
use nsml_common::now_ms;
use nsml_common::projection::Projection;
use nsml_eventstore::{EventStore, ExpectedVersion, NewEvent, StoreError};
use nsml_proto::v1::{
    AddUserRequest, ApplyCompetitionRequest, Competition, CompetitionApplied, Identity,
    LoginResponse, MemberAdded, PasswordChanged, PrivateRevealed, TeamCreated, TokenIssued,
    TokenRevoked, UserRegistered,
};
use parking_lot::Mutex;

use crate::domain::{self, TOKEN_TTL_MS, Throttle, policy_defaults};
use crate::error::AuthError;
use crate::projection::AuthState;

/// The platform administrator's user name.
pub const ADMIN_USER: &str = "admin";

/// How long a write waits for the read model to show it before answering anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The auth service's state and command handlers, shared by every call.
pub struct Auth {
    store: Arc<dyn EventStore>,
    proj: Arc<Projection<AuthState>>,
    throttle: Mutex<Throttle>,
}

impl Auth {
    /// Builds the handlers over a running projection.
    pub fn new(store: Arc<dyn EventStore>, proj: Arc<Projection<AuthState>>) -> Self {
        Self {
            store,
            proj,
            throttle: Mutex::default(),
        }
    }

    /// Reads the read model.
    pub fn read<R>(&self, f: impl FnOnce(&AuthState) -> R) -> R {
        self.proj.read(f)
    }

    /// Appends `events`, then waits until the read model shows them. Creating a stream that exists already
    /// is no change (`None`).
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        match self.store.append(stream, expected, events).await {
            Ok(a) => {
                if let Err(lag) = self.proj.wait_for(a.last_position, SETTLE_TIMEOUT).await {
                    // Stored: repeating the call would not help, so the lag is logged, not returned.
                    tracing::warn!(%lag, "the auth view did not show an append in time");
                }
                Ok(Some(a.last_position))
            }
            Err(StoreError::Conflict { .. }) if expected == ExpectedVersion::NoStream => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn issue_token(
        &self,
        username: &str,
        ttl_ms: i64,
        actor: &str,
    ) -> Result<(String, i64), AuthError> {
        let token = domain::new_token();
        let hash = domain::hash_token(&token);
        let expires = now_ms() + ttl_ms;
        let ev = new_event(
            &TokenIssued {
                token_hash: hash.clone(),
                username: username.to_string(),
                expires_at_ms: expires,
            },
            actor,
            "",
        );
        self.append(
            &format!("token-{hash}"),
            ExpectedVersion::NoStream,
            vec![ev],
        )
        .await
        .map_err(AuthError::store("issuing a token"))?;
        Ok((token, expires))
    }

    /// Makes sure the administrator exists and returns a fresh long-lived host token for it.
    pub async fn bootstrap_admin(&self) -> Result<String, AuthError> {
        let exists = self.read(|s| s.users.contains_key(ADMIN_USER));
        if !exists {
            // The administrator signs in with tokens only: its password is random and never shown.
            let hash = domain::hash_password(&domain::new_token())
                .map_err(AuthError::internal("hashing the admin password"))?;
            let ev = new_event(
                &UserRegistered {
                    username: ADMIN_USER.into(),
                    password_hash: hash,
                    admin: true,
                },
                "service:auth",
                "bootstrap-admin",
            );
            self.append(
                &format!("user-{ADMIN_USER}"),
                ExpectedVersion::NoStream,
                vec![ev],
            )
            .await
            .map_err(AuthError::store("registering the administrator"))?;
        }
        let ten_years = 10 * 365 * 24 * 3600 * 1000;
        let (token, _) = self
            .issue_token(ADMIN_USER, ten_years, "service:auth")
            .await?;
        Ok(token)
    }

    /// Checks a password, counting failures per user and address, and issues a login token.
    pub async fn login(
        &self,
        source: &str,
        username: String,
        password: String,
    ) -> Result<LoginResponse, AuthError> {
        // Every user name is an identifier: anything else cannot be a user, and is refused before it is
        // counted or stored anywhere.
        check_ident("user", &username)?;
        let now = now_ms();
        if let Err(until) = self.throttle.lock().check(source, &username, now) {
            return Err(AuthError::LockedOut {
                user: shown(&username).into_owned(),
                retry_after_secs: (until - now + 999) / 1000,
            });
        }
        let hash = self.read(|s| s.users.get(&username).map(|u| u.password_hash.clone()));
        // Argon2 takes tens of milliseconds of CPU: off the threads that serve requests.
        let ok = tokio::task::spawn_blocking(move || {
            domain::verify_or_pretend(&password, hash.as_deref())
        })
        .await
        .map_err(|e| AuthError::internal("verifying a password")(e.to_string()))?;
        if !ok {
            self.throttle.lock().fail(source, &username, now);
            return Err(AuthError::LoginFailed);
        }
        self.throttle.lock().succeed(source, &username);
        let (token, expires) = self
            .issue_token(&username, TOKEN_TTL_MS, &format!("user:{username}"))
            .await?;
        Ok(LoginResponse {
            token,
            expires_at_ms: expires,
            username,
        })
    }

    /// Revokes a login token.
    pub async fn logout(&self, token: &str, actor: &str) -> Result<(), AuthError> {
        let hash = domain::hash_token(token);
        let ev = new_event(
            &TokenRevoked {
                token_hash: hash.clone(),
            },
            actor,
            "",
        );
        self.append(&format!("token-{hash}"), ExpectedVersion::Any, vec![ev])
            .await
            .map_err(AuthError::store("ending a login"))?;
        Ok(())
    }

    /// The identity a live token stands for.
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let hash = domain::hash_token(token);
        let now = now_ms();
        self.read(|s| {
            s.tokens
                .get(&hash)
                .filter(|t| t.expires_at_ms > now)
                .and_then(|t| s.identity(&t.username))
        })
        .ok_or(AuthError::TokenExpired)
    }

    /// A competition as shown, or `NotFound` naming `id`.
    pub fn competition(&self, id: &str) -> Result<Competition, AuthError> {
        self.read(|s| s.competition_view(id))
            .ok_or_else(|| AuthError::CompetitionNotFound {
                id: shown(id).into_owned(),
            })
    }

    /// Refuses to change the password of an existing user whom `caller` does not manage. Administrators
    /// (and the platform's services) manage everyone; a host manages the users who are not administrators
    /// and belong, as members or hosts, to no competition the host does not host. Otherwise a host of one
    /// competition could take over the administrator's account, or another competition's.
    fn check_may_set_password(&self, caller: &Caller, username: &str) -> Result<(), AuthError> {
        if caller.is_admin() || caller.is_service() {
            return Ok(());
        }
        let refusal = self.read(|s| {
            let user = s.users.get(username)?;
            if user.admin {
                return Some(format!(
                    "user `{username}` is a platform administrator: only an administrator may change their password"
                ));
            }
            let id = s.identity(username)?;
            id.memberships
                .iter()
                .map(|m| &m.competition)
                .chain(&id.hosts)
                .find(|c| !caller.is_host_of(c))
                .map(|c| {
                    format!(
                        "user `{username}` takes part in competition `{c}`, which you do not host: only its hosts may change their password"
                    )
                })
        });
        match refusal {
            Some(why) => Err(AuthError::NotYourUser(why)),
            None => Ok(()),
        }
    }

    /// Registers the user if new (with a password) or sets a new password.
    async fn ensure_user(
        &self,
        caller: &Caller,
        username: &str,
        password: &str,
    ) -> Result<(), AuthError> {
        check_ident("user", username)?;
        let exists = self.read(|s| s.users.contains_key(username));
        if password.is_empty() && exists {
            return Ok(());
        }
        if exists {
            self.check_may_set_password(caller, username)?;
        }
        let actor = caller.actor();
        let actor = actor.as_str();
        // A user listed without a password can't log in until a host sets one.
        let hash = if password.is_empty() {
            String::new()
        } else {
            domain::check_password(username, password)?;
            domain::hash_password(password).map_err(AuthError::internal("hashing a password"))?
        };
        let stream = format!("user-{username}");
        if exists {
            let ev = new_event(
                &PasswordChanged {
                    username: username.into(),
                    password_hash: hash,
                },
                actor,
                "",
            );
            self.append(&stream, ExpectedVersion::Any, vec![ev])
                .await
                .map_err(AuthError::store("changing a password"))?;
        } else {
            let ev = new_event(
                &UserRegistered {
                    username: username.into(),
                    password_hash: hash,
                    admin: false,
                },
                actor,
                "",
            );
            self.append(&stream, ExpectedVersion::NoStream, vec![ev])
                .await
                .map_err(AuthError::store("registering a user"))?;
        }
        Ok(())
    }

    async fn ensure_team(&self, team: &str, actor: &str) -> Result<(), AuthError> {
        check_ident("team", team)?;
        if self.read(|s| s.teams.contains_key(team)) {
            return Ok(());
        }
        let ev = new_event(&TeamCreated { team: team.into() }, actor, "");
        self.append(&format!("team-{team}"), ExpectedVersion::NoStream, vec![ev])
            .await
            .map_err(AuthError::store("creating a team"))?;
        Ok(())
    }

    /// Adds `user` to `team` in `competition`, refusing a second team in the same competition.
    fn membership_event(
        state: &AuthState,
        team: &str,
        user: &str,
        competition: &str,
        actor: &str,
    ) -> Result<Option<NewEvent>, AuthError> {
        match state.team_of(user, competition) {
            Some(t) if t == team => Ok(None),
            Some(t) => Err(AuthError::InAnotherTeam {
                user: user.into(),
                team: t.to_string(),
                competition: competition.into(),
            }),
            None => Ok(Some(new_event(
                &MemberAdded {
                    team: team.into(),
                    username: user.into(),
                    competition: competition.into(),
                },
                actor,
                "",
            ))),
        }
    }

    /// The competitions a new member joins: the one named, or every one the team has entered.
    fn competitions_to_join(&self, r: &AddUserRequest) -> Result<Vec<String>, AuthError> {
        if r.competition.is_empty() {
            let cs = self.read(|s| s.competitions_of_team(&r.team));
            if cs.is_empty() {
                return Err(AuthError::NoCompetitionOfTeam {
                    team: r.team.clone(),
                });
            }
            return Ok(cs);
        }
        if !self.read(|s| s.competitions.contains_key(&r.competition)) {
            return Err(AuthError::CompetitionNotFound {
                id: r.competition.clone(),
            });
        }
        Ok(vec![r.competition.clone()])
    }

    /// Adds a user (new, or with a new password) to a team in the team's competitions, which the caller
    /// must host.
    pub async fn add_user(&self, caller: &Caller, r: AddUserRequest) -> Result<(), AuthError> {
        check_ident("team", &r.team)?;
        let competitions = self.competitions_to_join(&r)?;
        for c in &competitions {
            caller.require_host_of(c)?;
        }
        if r.password.is_empty() {
            return Err(AuthError::PasswordRequired);
        }
        let actor = caller.actor();
        // Refused before anything changes: a user already in another team of one of the competitions.
        for c in &competitions {
            self.read(|s| Self::membership_event(s, &r.team, &r.username, c, &actor))?;
        }
        self.ensure_user(caller, &r.username, &r.password).await?;
        self.ensure_team(&r.team, &actor).await?;
        for c in competitions {
            let ev = self.read(|s| Self::membership_event(s, &r.team, &r.username, &c, &actor))?;
            if let Some(ev) = ev {
                self.append(&format!("competition-{c}"), ExpectedVersion::Any, vec![ev])
                    .await
                    .map_err(AuthError::store("adding a member"))?;
            }
        }
        Ok(())
    }

    /// Refuses a manifest the caller may not apply: a new competition is the administrator's to create, an
    /// existing one its hosts' to change; a dataset belongs to one competition; passwords are set only for
    /// users the caller manages.
    fn check_may_apply(
        &self,
        caller: &Caller,
        c: &Competition,
        existing: Option<&Competition>,
        r: &ApplyCompetitionRequest,
    ) -> Result<(), AuthError> {
        match existing {
            Some(_) => caller.require_host_of(&c.id)?,
            None if caller.is_admin() || caller.is_service() => {}
            None => return Err(AuthError::AdminOnly),
        }
        let taken = self.read(|s| {
            c.datasets.iter().find_map(|d| {
                s.owner_of_dataset(&d.name)
                    .filter(|owner| *owner != c.id)
                    .map(|owner| (d.name.clone(), owner.to_string()))
            })
        });
        if let Some((dataset, owner)) = taken {
            return Err(AuthError::DatasetTaken { dataset, owner });
        }
        for u in r.users.iter().filter(|u| !u.password.is_empty()) {
            self.check_may_set_password(caller, &u.username)?;
        }
        Ok(())
    }

    /// Creates or updates a competition from a manifest: its users, hosts, teams and memberships.
    pub async fn apply_competition(
        &self,
        caller: &Caller,
        r: ApplyCompetitionRequest,
    ) -> Result<Competition, AuthError> {
        let mut c = r.competition.clone().ok_or(AuthError::NoCompetition)?;
        check_ident("competition", &c.id)?;
        if c.datasets.is_empty() {
            return Err(AuthError::NoDatasets {
                competition: c.id.clone(),
            });
        }
        crate::domain::check_rounds(&c)?;
        let existing = self.read(|s| s.competitions.get(&c.id).cloned());
        self.check_may_apply(caller, &c, existing.as_ref(), &r)?;
        c.policy = Some(policy_defaults(c.policy));
        c.policy_version = match &existing {
            Some(old) if old.policy == c.policy => old.policy_version,
            Some(old) => old.policy_version + 1,
            None => 1,
        };
        c.private_revealed = existing.as_ref().is_some_and(|o| o.private_revealed);
        let actor = caller.actor();
        for u in &r.users {
            self.ensure_user(caller, &u.username, &u.password).await?;
        }
        for h in &c.hosts {
            self.ensure_user(caller, h, "").await?;
        }
        let mut events = vec![new_event(
            &CompetitionApplied {
                competition: Some(c.clone()),
            },
            &actor,
            "",
        )];
        for t in &c.teams {
            self.ensure_team(&t.name, &actor).await?;
        }
        events.extend(self.team_members(caller, &c, &actor).await?);
        self.append(
            &format!("competition-{}", c.id),
            ExpectedVersion::Any,
            events,
        )
        .await
        .map_err(AuthError::store("applying a competition"))?;
        Ok(self.read(|s| s.competition_view(&c.id)).unwrap_or(c))
    }

    /// The memberships a manifest's teams add, registering members not known yet.
    async fn team_members(
        &self,
        caller: &Caller,
        c: &Competition,
        actor: &str,
    ) -> Result<Vec<NewEvent>, AuthError> {
        let mut events = Vec::new();
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for t in &c.teams {
            for m in &t.members {
                check_ident("user", m)?;
                if let Some(other) = seen.insert(m, &t.name)
                    && other != t.name
                {
                    return Err(AuthError::ListedTwice {
                        user: m.clone(),
                        first: other.to_string(),
                        second: t.name.clone(),
                    });
                }
                if !self.read(|s| s.users.contains_key(m)) {
                    self.ensure_user(caller, m, "").await?;
                }
                let ev = self.read(|s| Self::membership_event(s, &t.name, m, &c.id, actor))?;
                events.extend(ev);
            }
        }
        Ok(events)
    }

    /// Reveals a competition's private leaderboard; the caller must host it.
    pub async fn reveal_private(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Competition, AuthError> {
        if !self.read(|s| s.competitions.contains_key(id)) {
            return Err(AuthError::CompetitionNotFound {
                id: shown(id).into_owned(),
            });
        }
        caller.require_host_of(id)?;
        let ev = new_event(
            &PrivateRevealed {
                competition: id.to_string(),
            },
            &caller.actor(),
            "",
        );
        self.append(&format!("competition-{id}"), ExpectedVersion::Any, vec![ev])
            .await
            .map_err(AuthError::store("revealing the private leaderboard"))?;
        self.competition(id)
    }
}
