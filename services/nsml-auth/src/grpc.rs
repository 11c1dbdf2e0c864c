//! The `AuthService` gRPC API: checks who calls, decides, appends, answers once the change is visible.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::bounds::{self, shown};
use nsml_common::caller::Caller;
use nsml_common::event::new_event;
use nsml_common::names::check_ident;
use nsml_common::projection::Projection;
use nsml_common::{ServiceContext, now_ms, status};
use nsml_eventstore::{ExpectedVersion, NewEvent, StoreError};
use nsml_proto::v1::auth_service_server::AuthService as AuthApi;
use nsml_proto::v1::{
    AddUserRequest, ApplyCompetitionRequest, AuthenticateRequest, Competition, CompetitionApplied,
    Empty, GetCompetitionRequest, Identity, ListCompetitionsResponse, LoginRequest, LoginResponse,
    MemberAdded, PasswordChanged, Policy, PrivateRevealed, RevealPrivateRequest, TeamCreated,
    TokenIssued, TokenRevoked, UserRegistered,
};
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

use crate::domain::{self, TOKEN_TTL_MS, Throttle};
use crate::projection::AuthState;

/// The platform administrator's user name.
pub const ADMIN_USER: &str = "admin";
/// Metadata key under which the gateway names the address a public call came from. Only the gateway and
/// services reach the auth service (they carry the internal secret), and the gateway drops whatever
/// `x-nsml-*` metadata a client sent, so the value is the gateway's word.
pub const PEER_KEY: &str = "x-nsml-peer";

/// The auth service.
#[derive(Clone)]
pub struct AuthService {
    ctx: ServiceContext,
    proj: Arc<Projection<AuthState>>,
    throttle: Arc<Mutex<Throttle>>,
}

fn policy_defaults(p: Option<Policy>) -> Policy {
    let mut p = p.unwrap_or_default();
    let gib = 1024u64 * 1024 * 1024;
    if p.team_cpus == 0 {
        p.team_cpus = 16;
    }
    if p.team_memory_bytes == 0 {
        p.team_memory_bytes = 170 * gib;
    }
    if p.team_sessions == 0 {
        p.team_sessions = 2;
    }
    if p.team_storage_bytes == 0 {
        p.team_storage_bytes = 450 * gib;
    }
    if p.submit_time_limit_secs == 0 {
        p.submit_time_limit_secs = 3600;
    }
    if p.submit_max_cpus == 0 {
        p.submit_max_cpus = 4;
    }
    p
}

impl AuthService {
    pub(crate) fn new(ctx: ServiceContext, proj: Arc<Projection<AuthState>>) -> Self {
        Self {
            ctx,
            proj,
            throttle: Default::default(),
        }
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        match self.ctx.store.append(stream, expected, events).await {
            Ok(a) => {
                if let Err(lag) = self
                    .proj
                    .wait_for(a.last_position, Duration::from_secs(5))
                    .await
                {
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
    ) -> Result<(String, i64), Status> {
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
        .map_err(|e| status::store("issuing a token", e))?;
        Ok((token, expires))
    }

    /// Makes sure the administrator exists and returns a fresh long-lived host token for it.
    pub(crate) async fn bootstrap_admin(&self) -> Result<String, crate::AuthError> {
        let exists = self.proj.read(|s| s.users.contains_key(ADMIN_USER));
        if !exists {
            // The administrator signs in with tokens only: its password is random and never shown.
            let hash =
                domain::hash_password(&domain::new_token()).map_err(crate::AuthError::Hash)?;
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
            .await?;
        }
        let ten_years = 10 * 365 * 24 * 3600 * 1000;
        self.issue_token(ADMIN_USER, ten_years, "service:auth")
            .await
            .map(|(t, _)| t)
            .map_err(|s| crate::AuthError::Hash(s.message().to_string()))
    }

    fn bearer<T>(req: &Request<T>) -> Option<String> {
        let v = req.metadata().get("authorization")?.to_str().ok()?;
        v.strip_prefix("Bearer ").map(|t| t.trim().to_string())
    }

    /// Refuses to change the password of an existing user whom `caller` does not manage. Administrators
    /// (and the platform's services) manage everyone; a host manages the users who are not administrators
    /// and belong, as members or hosts, to no competition the host does not host. Otherwise a host of one
    /// competition could take over the administrator's account, or another competition's.
    fn check_may_set_password(&self, caller: &Caller, username: &str) -> Result<(), Status> {
        if caller.is_admin() || caller.is_service() {
            return Ok(());
        }
        let refusal = self.proj.read(|s| {
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
            Some(why) => Err(Status::permission_denied(why)),
            None => Ok(()),
        }
    }

    /// Registers the user if new (with a password) or sets a new password.
    async fn ensure_user(
        &self,
        caller: &Caller,
        username: &str,
        password: &str,
    ) -> Result<(), Status> {
        check_ident("user", username)?;
        let exists = self.proj.read(|s| s.users.contains_key(username));
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
            if password.len() < 4 {
                return Err(Status::invalid_argument(format!(
                    "the password for `{username}` is too short: use at least 4 characters"
                )));
            }
            domain::hash_password(password)
                .map_err(|e| status::internal("hashing a password", e))?
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
                .map_err(|e| status::store("changing a password", e))?;
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
                .map_err(|e| status::store("registering a user", e))?;
        }
        Ok(())
    }

    async fn ensure_team(&self, team: &str, actor: &str) -> Result<(), Status> {
        check_ident("team", team)?;
        if self.proj.read(|s| s.teams.contains_key(team)) {
            return Ok(());
        }
        let ev = new_event(&TeamCreated { team: team.into() }, actor, "");
        self.append(&format!("team-{team}"), ExpectedVersion::NoStream, vec![ev])
            .await
            .map_err(|e| status::store("creating a team", e))?;
        Ok(())
    }

    /// Adds `user` to `team` in `competition`, refusing a second team in the same competition.
    fn membership_event(
        &self,
        state: &AuthState,
        team: &str,
        user: &str,
        competition: &str,
        actor: &str,
    ) -> Result<Option<NewEvent>, Status> {
        match state.team_of(user, competition) {
            Some(t) if t == team => Ok(None),
            Some(t) => Err(Status::failed_precondition(format!(
                "user `{user}` is already in team `{t}` of competition `{competition}`; a user is in at most one team per competition"
            ))),
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
}

/// The address a call came from, as the gateway names it; calls from inside the deployment share one name.
fn source_of<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(PEER_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64)
        .unwrap_or("internal")
        .to_string()
}

#[tonic::async_trait]
impl AuthApi for AuthService {
    async fn login(&self, req: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        bounds::check(&req)?;
        let source = source_of(&req);
        let r = req.into_inner();
        // Every user name is an identifier: anything else cannot be a user, and is refused before it is
        // counted or stored anywhere.
        check_ident("user", &r.username)?;
        let now = now_ms();
        if let Err(until) = self.throttle.lock().check(&source, &r.username, now) {
            return Err(Status::resource_exhausted(format!(
                "too many failed logins for `{}` from your address: try again in {} seconds",
                shown(&r.username),
                (until - now + 999) / 1000
            )));
        }
        let hash = self
            .proj
            .read(|s| s.users.get(&r.username).map(|u| u.password_hash.clone()));
        let password = r.password.clone();
        // Argon2 takes tens of milliseconds of CPU: off the threads that serve requests.
        let ok = tokio::task::spawn_blocking(move || {
            domain::verify_or_pretend(&password, hash.as_deref())
        })
        .await
        .map_err(|e| status::internal("verifying a password", e))?;
        if !ok {
            self.throttle.lock().fail(&source, &r.username, now);
            return Err(Status::unauthenticated("wrong username or password"));
        }
        self.throttle.lock().succeed(&source, &r.username);
        let (token, expires) = self
            .issue_token(&r.username, TOKEN_TTL_MS, &format!("user:{}", r.username))
            .await?;
        Ok(Response::new(LoginResponse {
            token,
            expires_at_ms: expires,
            username: r.username,
        }))
    }

    async fn logout(&self, req: Request<Empty>) -> Result<Response<Empty>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.user()?;
        let token = Self::bearer(&req).ok_or_else(|| Status::unauthenticated("no token to end"))?;
        let hash = domain::hash_token(&token);
        let ev = new_event(
            &TokenRevoked {
                token_hash: hash.clone(),
            },
            &caller.actor(),
            "",
        );
        self.append(&format!("token-{hash}"), ExpectedVersion::Any, vec![ev])
            .await
            .map_err(|e| status::store("ending a login", e))?;
        Ok(Response::new(Empty {}))
    }

    async fn who_am_i(&self, req: Request<Empty>) -> Result<Response<Identity>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Ok(Response::new(caller.user()?.clone()))
    }

    async fn add_user(&self, req: Request<AddUserRequest>) -> Result<Response<Empty>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        check_ident("team", &r.team)?;
        let competitions = if r.competition.is_empty() {
            let cs = self.proj.read(|s| s.competitions_of_team(&r.team));
            if cs.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "team `{}` has not entered any competition: pass --competition",
                    r.team
                )));
            }
            cs
        } else {
            if !self
                .proj
                .read(|s| s.competitions.contains_key(&r.competition))
            {
                return Err(Status::not_found(format!(
                    "competition `{}` not found",
                    r.competition
                )));
            }
            vec![r.competition.clone()]
        };
        for c in &competitions {
            caller.require_host_of(c)?;
        }
        if r.password.is_empty() {
            return Err(Status::invalid_argument(
                "a password is required: pass it on stdin with --password-stdin",
            ));
        }
        let actor = caller.actor();
        // Refused before anything changes: a user already in another team of one of the competitions.
        for c in &competitions {
            self.proj
                .read(|s| self.membership_event(s, &r.team, &r.username, c, &actor))?;
        }
        self.ensure_user(&caller, &r.username, &r.password).await?;
        self.ensure_team(&r.team, &actor).await?;
        for c in competitions {
            let ev = self
                .proj
                .read(|s| self.membership_event(s, &r.team, &r.username, &c, &actor))?;
            if let Some(ev) = ev {
                self.append(&format!("competition-{c}"), ExpectedVersion::Any, vec![ev])
                    .await
                    .map_err(|e| status::store("adding a member", e))?;
            }
        }
        Ok(Response::new(Empty {}))
    }

    async fn apply_competition(
        &self,
        req: Request<ApplyCompetitionRequest>,
    ) -> Result<Response<Competition>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let mut c = r
            .competition
            .ok_or_else(|| Status::invalid_argument("the manifest has no competition"))?;
        check_ident("competition", &c.id)?;
        if c.datasets.is_empty() {
            return Err(Status::invalid_argument(format!(
                "competition `{}` lists no datasets",
                c.id
            )));
        }
        let existing = self.proj.read(|s| s.competitions.get(&c.id).cloned());
        match &existing {
            Some(_) => caller.require_host_of(&c.id)?,
            None if caller.is_admin() || caller.is_service() => {}
            None => {
                return Err(Status::permission_denied(
                    "only the platform administrator may create a competition",
                ));
            }
        }
        let taken = self.proj.read(|s| {
            c.datasets.iter().find_map(|d| {
                s.owner_of_dataset(&d.name)
                    .filter(|owner| *owner != c.id)
                    .map(|owner| (d.name.clone(), owner.to_string()))
            })
        });
        if let Some((dataset, owner)) = taken {
            return Err(Status::already_exists(format!(
                "dataset `{dataset}` belongs to competition `{owner}`: a dataset is in one competition only"
            )));
        }
        for u in r.users.iter().filter(|u| !u.password.is_empty()) {
            self.check_may_set_password(&caller, &u.username)?;
        }
        c.policy = Some(policy_defaults(c.policy));
        c.policy_version = match &existing {
            Some(old) if old.policy == c.policy => old.policy_version,
            Some(old) => old.policy_version + 1,
            None => 1,
        };
        c.private_revealed = existing.as_ref().is_some_and(|o| o.private_revealed);
        let actor = caller.actor();
        for u in &r.users {
            self.ensure_user(&caller, &u.username, &u.password).await?;
        }
        for h in &c.hosts {
            self.ensure_user(&caller, h, "").await?;
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
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for t in &c.teams {
            for m in &t.members {
                check_ident("user", m)?;
                if let Some(other) = seen.insert(m, &t.name)
                    && other != t.name
                {
                    return Err(Status::invalid_argument(format!(
                        "user `{m}` is listed in teams `{other}` and `{}`; a user is in at most one team per competition",
                        t.name
                    )));
                }
                if !self.proj.read(|s| s.users.contains_key(m)) {
                    self.ensure_user(&caller, m, "").await?;
                }
                let ev = self
                    .proj
                    .read(|s| self.membership_event(s, &t.name, m, &c.id, &actor))?;
                events.extend(ev);
            }
        }
        self.append(
            &format!("competition-{}", c.id),
            ExpectedVersion::Any,
            events,
        )
        .await
        .map_err(|e| status::store("applying a competition", e))?;
        let view = self.proj.read(|s| s.competition_view(&c.id)).unwrap_or(c);
        Ok(Response::new(view))
    }

    async fn list_competitions(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<ListCompetitionsResponse>, Status> {
        bounds::check(&req)?;
        Caller::of(&req)?.require_authenticated()?;
        let competitions = self.proj.read(|s| {
            s.competitions
                .keys()
                .filter_map(|id| s.competition_view(id))
                .collect()
        });
        Ok(Response::new(ListCompetitionsResponse { competitions }))
    }

    async fn get_competition(
        &self,
        req: Request<GetCompetitionRequest>,
    ) -> Result<Response<Competition>, Status> {
        bounds::check(&req)?;
        Caller::of(&req)?.require_authenticated()?;
        let id = req.into_inner().id;
        self.proj
            .read(|s| s.competition_view(&id))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("competition `{}` not found", shown(&id))))
    }

    async fn reveal_private(
        &self,
        req: Request<RevealPrivateRequest>,
    ) -> Result<Response<Competition>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let id = req.into_inner().competition;
        if !self.proj.read(|s| s.competitions.contains_key(&id)) {
            return Err(Status::not_found(format!(
                "competition `{}` not found",
                shown(&id)
            )));
        }
        caller.require_host_of(&id)?;
        let ev = new_event(
            &PrivateRevealed {
                competition: id.clone(),
            },
            &caller.actor(),
            "",
        );
        self.append(&format!("competition-{id}"), ExpectedVersion::Any, vec![ev])
            .await
            .map_err(|e| status::store("revealing the private leaderboard", e))?;
        self.proj
            .read(|s| s.competition_view(&id))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("competition `{}` not found", shown(&id))))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<Identity>, Status> {
        bounds::check(&req)?;
        Caller::of(&req)?.require_service()?;
        let hash = domain::hash_token(&req.into_inner().token);
        let now = now_ms();
        self.proj
            .read(|s| {
                s.tokens
                    .get(&hash)
                    .filter(|t| t.expires_at_ms > now)
                    .and_then(|t| s.identity(&t.username))
            })
            .map(Response::new)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "your login has expired or was ended: run `nsml login` again",
                )
            })
    }
}
