//! Which process sweeps the outbox, where several share one log.

use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::Mutex;

/// Whether this process sweeps the outbox. Where several processes append to one log, the one holding the
/// lease publishes every process's appends, in position order; the others wait to take the lease over. Were
/// each to publish its own appends as well, subscribers would get the events of two processes out of order
/// and read the store to fill each gap.
///
/// The lease only saves work: should two processes both believe they hold it for a moment, events are
/// published twice, which consumers drop as duplicates.
#[async_trait::async_trait]
pub trait OutboxLease: Send + Sync + 'static {
    /// Whether this process holds the lease now, taking it if it is free.
    async fn held(&self) -> bool;
}

/// How long an answer of [`PostgresLease::held`] stands before the lease is looked at again.
const RECHECK: Duration = Duration::from_secs(1);

/// The advisory lock behind the lease: the same number in every process sharing the database.
const LOCK_KEY: i64 = 0x6e73_6d6c_0b0c;

/// The outbox lease of a Postgres log: a session-level advisory lock held on a connection of its own. The
/// lock goes with the connection, so when the holding process dies (or its connection drops) another takes
/// the lease at its next look, within about a second.
pub struct PostgresLease {
    pool: PgPool,
    state: Mutex<LeaseState>,
}

struct LeaseState {
    connection: Option<PgConnection>,
    held: bool,
    checked: Option<Instant>,
}

impl PostgresLease {
    pub(crate) fn new(pool: PgPool) -> Self {
        PostgresLease {
            pool,
            state: Mutex::new(LeaseState {
                connection: None,
                held: false,
                checked: None,
            }),
        }
    }

    /// Looks at the lease: a holder checks that its connection (and so its lock) is still there; anyone else
    /// tries to take the lock, on a fresh connection if it has none.
    async fn look(&self, state: &mut LeaseState) -> Result<bool, sqlx::Error> {
        let connection = match &mut state.connection {
            Some(connection) => connection,
            None => {
                let options = (*self.pool.connect_options()).clone();
                state.connection.insert(options.connect().await?)
            }
        };
        if state.held {
            connection.ping().await?;
            return Ok(true);
        }
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(connection)
            .await
    }
}

#[async_trait::async_trait]
impl OutboxLease for PostgresLease {
    async fn held(&self) -> bool {
        let mut state = self.state.lock().await;
        if state.checked.is_some_and(|at| at.elapsed() < RECHECK) {
            return state.held;
        }
        state.checked = Some(Instant::now());
        state.held = match self.look(&mut state).await {
            Ok(held) => held,
            Err(error) => {
                if state.held {
                    tracing::warn!(%error, "lost the outbox lease");
                }
                // A new connection next time; the lock, if it was held, went with the old one.
                state.connection = None;
                false
            }
        };
        state.held
    }
}
